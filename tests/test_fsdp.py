"""FSDP2: the accelerate configs, the `_no_split_modules` they wrap by, and a real two-process sharded step on CPU."""

import datetime
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin, fsdp2_prepare_model
from accelerate.utils.launch import prepare_multi_gpu_env
from diffusers import SanaTransformer2DModel
from safetensors.torch import load_file, save_file
from test_generator import TINY_INTERNVL, TINY_LLAMA, _batch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from spar_hf import SparForConditionalGeneration, SparTokenizerModel
from spar_hf.distributed import no_split_module_classes, save_full_checkpoint, shard_model
from spar_hf.presets import preset_configs

CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "configs"
WORLD_SIZE = 2


def _built_classes(model):
    return {type(module).__name__ for module in model.modules()}


def _generator(**generator_overrides):
    _, config = preset_configs("tiny", **{f"generator_{k}": v for k, v in generator_overrides.items()})
    torch.manual_seed(0)
    return SparForConditionalGeneration(config)


def _tokenizer_model():
    torch.manual_seed(0)
    return SparTokenizerModel(preset_configs("tiny")[0])


# ----------------------------------------------------------------------------- _no_split_modules


@pytest.mark.parametrize(
    "cls, get_module",
    [
        (SparForConditionalGeneration, _generator),
        (SparTokenizerModel, _tokenizer_model),
        (SanaTransformer2DModel, lambda: _generator().transformer),
    ],
)
def test_no_split_modules_name_built_classes(cls, get_module):
    module = get_module()
    assert cls._no_split_modules
    missing = set(cls._no_split_modules) - _built_classes(module)
    assert not missing, f"{cls.__name__}._no_split_modules names classes the tiny model does not build: {missing}"


def test_no_split_module_classes_keep_built_ones():
    # BERT lists `BertEmbeddings` too, but it contains the token embeddings, which are sharded on their own.
    assert no_split_module_classes(_generator()) == [
        "BertLayer", "PatchEmbed", "SanaModulatedNorm", "SanaTransformerBlock", "TransformerBlock",
    ]
    tokenizer = _tokenizer_model()
    # transformers adds SigLIP's whole list, text embeddings included, to the instance's `_no_split_modules`.
    assert "SiglipTextEmbeddings" in tokenizer._no_split_modules
    assert "SiglipTextEmbeddings" not in no_split_module_classes(tokenizer)
    assert {"TransformerBlock", "SiglipEncoderLayer"} <= set(no_split_module_classes(tokenizer))


# ----------------------------------------------------------------------------- accelerate configs


def _launch_environment(config_file):
    """Return the environment `accelerate launch --config_file config_file` gives each process, without launching."""
    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    # `accelerate launch` merges the config file into its arguments in this (private) step.
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, num_processes", [("fsdp2_1gpu.yaml", 1), ("fsdp2_8gpu.yaml", 8)])
def test_accelerate_fsdp2_config(name, num_processes):
    environment = _launch_environment(CONFIG_DIR / name)
    assert environment["ACCELERATE_USE_FSDP"] == "true"
    assert environment["FSDP_VERSION"] == "2"
    assert environment["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert environment["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    # No explicit class list: accelerate takes the wrap classes from the model's `_no_split_modules`.
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in environment
    assert int(environment.get("WORLD_SIZE", num_processes)) == num_processes

    models = {
        "tiny generator (BERT)": (_generator(), {"BertLayer", "TransformerBlock", "SanaTransformerBlock"}),
        "tiny generator (InternVL)": (
            _generator(mllm_config=TINY_INTERNVL),
            {"Qwen2DecoderLayer", "InternVLVisionLayer", "TransformerBlock", "SanaTransformerBlock"},
        ),
        "tiny tokenizer": (_tokenizer_model(), {"TransformerBlock", "SiglipEncoderLayer"}),
    }
    for label, (model, blocks) in models.items():
        with mock.patch.dict(os.environ, environment):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        plugin.set_auto_wrap_policy(model)
        wrapped = set(plugin.transformer_cls_names_to_wrap)
        assert wrapped <= _built_classes(model), label
        assert blocks <= wrapped, label
        assert wrapped == set(no_split_module_classes(model)), label


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# FSDP2 warns that PatchEmbed and the root return views. Nothing modifies them in place, and the
# two-process test below checks that every gradient still equals the single-process one.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize(
    "make_model, make_inputs",
    [
        # An lm_head tied to the token embeddings must share their FSDP group.
        pytest.param(
            lambda: _generator(mllm_config={**TINY_LLAMA, "tie_word_embeddings": True}, mllm_head="causal_lm"),
            _batch, id="generator-tied-lm-head",
        ),
        # The tokenizer has no token embeddings: its `get_input_embeddings` raises.
        pytest.param(
            _tokenizer_model, lambda: {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1}, id="tokenizer",
        ),
    ],
)
def test_shard_model_runs_training_step(single_process_group, make_model, make_inputs):
    model = shard_model(make_model()).train()
    assert isinstance(model, FSDPModule)
    loss = model(**make_inputs()).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


# accelerate refuses FSDP without GPUs, so these run its FSDP2 preparation step directly, with a
# stand-in for the few `Accelerator` attributes it reads, then one training step of the result.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")
@pytest.mark.parametrize(
    "make_model, make_inputs",
    [
        pytest.param(_tokenizer_model, lambda: {"pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1}, id="tokenizer"),
        pytest.param(_generator, _batch, id="generator-bert"),
        pytest.param(lambda: _generator(mllm_config=TINY_INTERNVL), _batch, id="generator-internvl"),
        pytest.param(
            lambda: _generator(mllm_config={**TINY_LLAMA, "tie_word_embeddings": True}, mllm_head="causal_lm"),
            _batch, id="generator-tied-lm-head",
        ),
    ],
)
def test_accelerate_fsdp2_prepared_model_trains(single_process_group, make_model, make_inputs):
    with mock.patch.dict(os.environ, _launch_environment(CONFIG_DIR / "fsdp2_1gpu.yaml")):
        plugin = FullyShardedDataParallelPlugin()
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
        is_main_process=True, mixed_precision="no", device=torch.device("cpu"),
    )
    model = fsdp2_prepare_model(accelerator, make_model()).train()
    assert isinstance(model, FSDPModule)
    loss = model(**make_inputs()).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_accelerate_configs_differ_only_in_process_count():
    configs = {name: (CONFIG_DIR / name).read_text().splitlines() for name in ("fsdp2_1gpu.yaml", "fsdp2_8gpu.yaml")}
    settings = {name: [line for line in lines if line and not line.startswith("#")] for name, lines in configs.items()}
    differing = set(settings["fsdp2_1gpu.yaml"]) ^ set(settings["fsdp2_8gpu.yaml"])
    assert differing == {"num_processes: 1", "num_processes: 8"}


# ----------------------------------------------------------------------------- two-process FSDP2 step on CPU


def _fsdp_model():
    # No condition dropout: its random draw would differ between one process and two.
    return _generator(cond_dropout_prob=0.0)


def _global_batch():
    batch = _batch(batch=4)
    generator = torch.Generator().manual_seed(1)
    batch["noise"] = torch.randn(batch["latents"].shape, generator=generator)
    batch["sigmas"] = torch.tensor([0.1, 0.4, 0.6, 0.9])
    return batch


def _train_step(model, batch):
    """Run one SGD step and return the loss and the full gradients of the trainable parameters."""
    model.train()
    # SGD rather than Adam: key biases have an exact zero gradient (softmax ignores a shift shared by
    # all keys), and Adam's first step scales the float noise on them up to about the learning rate.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**batch).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            # `full_tensor` is a collective, and every rank reaches it for the same names in the same order.
            grads[name] = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad.clone()
    optimizer.step()
    return loss.detach(), grads


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=120))
    try:
        model = shard_model(_fsdp_model())
        batch = {key: value.chunk(WORLD_SIZE)[rank] for key, value in _global_batch().items()}
        loss, grads = _train_step(model, batch)
        dist.all_reduce(loss)
        save_full_checkpoint(model, os.path.join(folder, "checkpoint"))

        params = dict(model.named_parameters())
        report = {
            "loss": loss.item() / WORLD_SIZE,
            "fsdp_modules": sorted(type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)),
            "sharded": sorted(name for name, p in params.items() if isinstance(p, DTensor)),
            "queries_local_rows": params["queries"].to_local().shape[0],
        }
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        if rank == 0:
            save_file({name: grad.contiguous() for name, grad in grads.items()}, os.path.join(folder, "grads.safetensors"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_step_matches_single_process(tmp_path):
    mp.spawn(_fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]

    reference = _fsdp_model()
    initial = {name: value.clone() for name, value in reference.state_dict().items()}
    trainable = {name for name, param in reference.named_parameters() if param.requires_grad}
    reference_loss, reference_grads = _train_step(reference, _global_batch())

    # Sharding: one group for the token embeddings, one per `_no_split_modules` block (3 BERT layers,
    # 1 connector block, 2 SANA blocks, embeddings and norms), then the root. Each rank stores half of
    # every parameter.
    parameter_names = {name for name, _ in reference.named_parameters()}
    for report in reports:
        # Every parameter is sharded, the one-value DTR gate included.
        assert set(report["sharded"]) == parameter_names
        assert "FSDPEmbedding" in report["fsdp_modules"]
        assert report["queries_local_rows"] == reference.config.num_queries // WORLD_SIZE
        assert report["fsdp_modules"].count("FSDPBertLayer") == 3
        assert report["fsdp_modules"].count("FSDPSanaTransformerBlock") == 2
        assert report["fsdp_modules"].count("FSDPTransformerBlock") == 1
        assert "FSDPSparForConditionalGeneration" in report["fsdp_modules"]

    # The loss is the mean of the rank losses, the gradients the average of the rank gradients.
    assert reports[0]["loss"] == pytest.approx(reference_loss.item(), abs=1e-6)
    grads = load_file(tmp_path / "grads.safetensors")
    assert grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-5, atol=1e-6), name

    # The gathered checkpoint reloads with the updated weights: trainable ones moved, the MLLM did not.
    reloaded = SparForConditionalGeneration.from_pretrained(tmp_path / "checkpoint").state_dict()
    assert reloaded.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.allclose(reloaded[name], value, atol=1e-5), name
    moved = {name for name in trainable if not torch.allclose(reloaded[name], initial[name], atol=1e-5)}
    assert {"queries", "router.gate", "connector.proj.weight", "transformer.proj_out.weight"} <= moved
    assert all(torch.equal(reloaded[name], initial[name]) for name in initial if name.startswith("mllm."))
