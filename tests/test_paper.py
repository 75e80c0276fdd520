"""The paper configuration built from tiny random checkpoints of the classes it loads.

The checkpoints mirror the real ones where it matters for loading: an InternVL MLLM saved in bfloat16 (as
InternVL3-hf is), a DC-AE with SANA's interpolating upsampler and an attention stage, and a SANA DiT on the
DC-AE latent.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from spar_hf import SparPipeline
from spar_hf.paper import build_paper_pipeline, paper_configs
from spar_hf.presets import sana_config

from test_generator import TINY_INTERNVL

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "green", "apple", "sun", "behind", "cloud", "cat"]
LATENT_CHANNELS = 4
IMAGE_SIZE = 32  # DiT sample_size 4 x DC-AE ratio 8
# Small values for the fields whose paper defaults (256 queries, 6 connector layers, block 8) need a real model.
SMALL = {"num_queries": 4, "connector_num_layers": 1, "align_layer": 2, "align_projector_dim": 32}


def _save_mllm(folder: Path) -> None:
    config = copy.deepcopy(TINY_INTERNVL)
    config["vision_config"].update(image_size=[32, 32], patch_size=[4, 4])
    torch.manual_seed(1)
    model = InternVLForConditionalGeneration(AutoConfig.for_model(**config))
    model.to(torch.bfloat16).save_pretrained(folder)

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


def _dcae_arguments(latent_channels: int = LATENT_CHANNELS) -> dict:
    """A ratio-8 DC-AE shaped like SANA's f32c32: interpolating upsampler, convolution downsampler, attention last."""
    block_types = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"]
    return {
        "latent_channels": latent_channels, "attention_head_dim": 8,
        "encoder_block_types": block_types, "decoder_block_types": block_types,
        "encoder_block_out_channels": (8, 16, 32, 32), "decoder_block_out_channels": (8, 16, 32, 32),
        "encoder_layers_per_block": (1, 1, 1, 1), "decoder_layers_per_block": (1, 1, 1, 1),
        "encoder_qkv_multiscales": ((), (), (), (5,)), "decoder_qkv_multiscales": ((), (), (), (5,)),
        "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
        "decoder_norm_types": ["batch_norm", "batch_norm", "rms_norm", "rms_norm"],
        "decoder_act_fns": ["relu", "relu", "silu", "silu"], "scaling_factor": 0.4,
    }


def _save_dcae(folder: Path) -> None:
    torch.manual_seed(2)
    AutoencoderDC(**_dcae_arguments()).save_pretrained(folder)


def _save_sana(folder: Path) -> None:
    torch.manual_seed(3)
    SanaTransformer2DModel(**sana_config(LATENT_CHANNELS, 32, 2, 16, 32, 4)).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {"mllm_path": root / "internvl", "dcae_path": root / "dcae", "sana_path": root / "sana"}
    _save_mllm(paths["mllm_path"])
    _save_dcae(paths["dcae_path"])
    _save_sana(paths["sana_path"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def paper_pipeline(checkpoints):
    torch.manual_seed(0)
    return build_paper_pipeline(**checkpoints, **SMALL)


def _generate(pipe: SparPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red apple", num_inference_steps=2, generator=generator, output_type="np").images


def _assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name].to(ours[name].dtype))]
    assert different == []


# ----------------------------------------------------------------------------- configs


def test_configs_tokenizer_fields(checkpoints):
    tokenizer_config, _ = paper_configs(**checkpoints, **SMALL)
    assert tokenizer_config.vision_config.model_type == "internvl_vision"
    assert tokenizer_config.vision_image_size == 32
    assert tokenizer_config.vision_image_mean == IMAGENET_DEFAULT_MEAN
    assert tokenizer_config.vision_image_std == IMAGENET_DEFAULT_STD
    assert tokenizer_config.downsample_ratio == 8
    assert tokenizer_config.latent_channels == LATENT_CHANNELS
    assert tokenizer_config.image_size == IMAGE_SIZE
    assert tokenizer_config.scaling_factor == 0.4
    assert tokenizer_config.pixel_teacher_config["upsample_block_type"] == "interpolate"


def test_configs_decoder_mirrors_dcae(checkpoints):
    tokenizer_config, _ = paper_configs(**checkpoints, **SMALL)
    decoder = tokenizer_config.decoder_config
    dcae = _dcae_arguments()
    assert decoder["block_out_channels"] == list(dcae["decoder_block_out_channels"])
    assert decoder["block_types"] == dcae["decoder_block_types"]
    assert decoder["norm_types"] == dcae["decoder_norm_types"]
    assert decoder["act_fns"] == dcae["decoder_act_fns"]
    assert decoder["qkv_multiscales"] == [[], [], [], [5]]
    assert decoder["upsample_block_type"] == "interpolate"
    assert decoder["attention_head_dim"] == 8


def test_configs_generator_fields(checkpoints):
    _, generator_config = paper_configs(**checkpoints, **SMALL)
    assert generator_config.mllm_config.model_type == "internvl"
    assert generator_config.mllm_config.dtype is None  # the bfloat16 of the checkpoint is not imposed on the build
    assert generator_config.mllm_head == "image_text_to_text"
    assert generator_config.num_queries == 4
    assert generator_config.routing_layers == [1, 2]
    assert generator_config.connector_num_heads == 2
    assert generator_config.align_layer == 2
    assert generator_config.align_feature_dim == 32
    saved = SanaTransformer2DModel.load_config(checkpoints["sana_path"])
    assert generator_config.transformer_config == {k: v for k, v in saved.items() if not k.startswith("_")}


def test_configs_paper_defaults(checkpoints):
    _, generator_config = paper_configs(**checkpoints, align_layer=2)
    assert generator_config.num_queries == 256
    assert generator_config.connector_num_layers == 6
    assert generator_config.align_projector_dim == 2048
    assert generator_config.flow_shift == 3.0


def test_configs_overrides_reach_each_side(checkpoints):
    tokenizer_config, generator_config = paper_configs(
        **checkpoints, **SMALL, image_size=64, tokenizer_pixel_num_layers=3, generator_routing_mode="last"
    )
    assert tokenizer_config.image_size == 64
    assert tokenizer_config.pixel_num_layers == 3
    assert generator_config.routing_mode == "last"


def test_configs_read_image_processor_normalisation(checkpoints, tmp_path):
    folder = tmp_path / "internvl"
    folder.mkdir()
    (folder / "config.json").write_text(Path(checkpoints["mllm_path"], "config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    tokenizer_config, _ = paper_configs(folder, checkpoints["dcae_path"], checkpoints["sana_path"], **SMALL)
    assert tokenizer_config.vision_image_mean == [0.5, 0.5, 0.5]
    assert tokenizer_config.vision_image_std == [0.25, 0.25, 0.25]


def test_configs_accept_pipeline_folders(checkpoints, tmp_path):
    sana_pipeline = tmp_path / "sana_pipeline"
    for source, subfolder in (("dcae_path", "vae"), ("sana_path", "transformer")):
        target = sana_pipeline / subfolder
        target.mkdir(parents=True)
        (target / "config.json").write_text(Path(checkpoints[source], "config.json").read_text())
    tokenizer_config, generator_config = paper_configs(checkpoints["mllm_path"], sana_pipeline, sana_pipeline, **SMALL)
    assert tokenizer_config.latent_channels == LATENT_CHANNELS
    assert generator_config.transformer_config["in_channels"] == LATENT_CHANNELS


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("argument", ["mllm_path", "dcae_path", "sana_path"])
def test_missing_path_rejected(checkpoints, tmp_path, argument):
    paths = {**checkpoints, argument: str(tmp_path / "absent")}
    with pytest.raises(ValueError, match=f"`{argument}` must be a local folder with .* which does not exist"):
        paper_configs(**paths, **SMALL)


def test_folder_without_config_rejected(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="`sana_path` .* has no config.json or transformer/config.json"):
        paper_configs(checkpoints["mllm_path"], checkpoints["dcae_path"], tmp_path, **SMALL)


def test_swapped_checkpoints_rejected(checkpoints):
    with pytest.raises(ValueError, match="`dcae_path` .* contains a config for 'SanaTransformer2DModel'"):
        paper_configs(checkpoints["mllm_path"], checkpoints["sana_path"], checkpoints["sana_path"], **SMALL)


def test_mllm_without_vision_tower_rejected(checkpoints, tmp_path):
    AutoConfig.for_model("qwen2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`mllm_path` .* contains a 'qwen2' config, which is not an image-text-to-text model"):
        paper_configs(tmp_path, checkpoints["dcae_path"], checkpoints["sana_path"], **SMALL)


def test_mismatched_latent_channels_rejected(checkpoints, tmp_path):
    SanaTransformer2DModel.from_config(sana_config(8, 32, 2, 16, 32, 4)).save_config(tmp_path)
    with pytest.raises(ValueError, match="`sana_path` .* has in_channels=8 and out_channels=8, but the DC-AE .* latent_channels=4"):
        paper_configs(checkpoints["mllm_path"], checkpoints["dcae_path"], tmp_path, **SMALL)


def test_align_layer_outside_dit_rejected(checkpoints):
    with pytest.raises(ValueError, match=r"`align_layer` must be in \[1, 2\], the blocks of the DiT .* Got 8"):
        paper_configs(**checkpoints, num_queries=4)


def test_image_size_off_grid_rejected(checkpoints):
    with pytest.raises(ValueError, match="`image_size` must be a positive multiple of 8 .* Got 36"):
        paper_configs(**checkpoints, **SMALL, image_size=36)


def test_unknown_override_rejected(checkpoints):
    with pytest.raises(TypeError, match="Unknown keyword argument 'tokenizer_pixel_layers'"):
        paper_configs(**checkpoints, **SMALL, tokenizer_pixel_layers=3)


def test_weights_that_do_not_fit_rejected(checkpoints):
    decoder = paper_configs(**checkpoints, **SMALL)[0].decoder_config
    decoder["layers_per_block"] = [1, 1, 2, 1]
    with pytest.raises(ValueError, match=r"do not fit `vae.decoder`: 5 missing \(e.g. \['up_blocks.2.2.conv1.bias'"):
        build_paper_pipeline(**checkpoints, **SMALL, tokenizer_decoder_config=decoder)


# ----------------------------------------------------------------------------- weights


def test_mllm_weights_from_checkpoint(checkpoints, paper_pipeline):
    reference = InternVLForConditionalGeneration.from_pretrained(checkpoints["mllm_path"])
    _assert_same_weights(paper_pipeline.model.mllm, reference)
    assert paper_pipeline.model.mllm.dtype == torch.float32


def test_vision_encoder_is_mllm_vision_tower(paper_pipeline):
    _assert_same_weights(paper_pipeline.vae.vision_encoder, paper_pipeline.model.mllm.model.vision_tower)


def test_teacher_and_decoder_from_dcae(checkpoints, paper_pipeline):
    reference = AutoencoderDC.from_pretrained(checkpoints["dcae_path"])
    _assert_same_weights(paper_pipeline.vae.pixel_teacher, reference)
    _assert_same_weights(paper_pipeline.vae.decoder, reference.decoder)


def test_dit_weights_from_sana(checkpoints, paper_pipeline):
    _assert_same_weights(paper_pipeline.model.transformer, SanaTransformer2DModel.from_pretrained(checkpoints["sana_path"]))


def test_vision_anchor_gets_vision_tower(checkpoints, paper_pipeline):
    pipe = build_paper_pipeline(**checkpoints, **SMALL, tokenizer_train_vision_encoder=True)
    _assert_same_weights(pipe.vae.vision_anchor, paper_pipeline.model.mllm.model.vision_tower)


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_parts(paper_pipeline):
    assert isinstance(paper_pipeline.processor, PreTrainedTokenizerFast)  # the folder has a tokenizer only
    assert isinstance(paper_pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert paper_pipeline.scheduler.config.shift == 3.0
    assert not paper_pipeline.model.training
    assert not paper_pipeline.vae.training


def test_pretrained_parts_stay_frozen(paper_pipeline):
    model, vae = paper_pipeline.model, paper_pipeline.vae
    assert not any(p.requires_grad for p in model.mllm.parameters())
    assert not any(p.requires_grad for p in vae.vision_encoder.parameters())
    assert not any(p.requires_grad for p in vae.pixel_teacher.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    assert all(p.requires_grad for p in vae.decoder.parameters())


def test_generates_image_in_two_steps(paper_pipeline):
    images = _generate(paper_pipeline)
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(images).all()


def test_built_models_compute_training_losses(paper_pipeline):
    vae, model = paper_pipeline.vae, paper_pipeline.model
    pixel_values = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        tokenizer_output = vae(pixel_values)
        latents = vae.encode(pixel_values).latents  # (2, 4, 4, 4)
        features = vae.get_semantic_features(pixel_values, grid_size=4)  # (2, 16, 32): the InternVL vision width
        output = model(input_ids=torch.tensor([[2, 3, 4], [5, 6, 7]]), latents=latents, semantic_features=features)
    assert tokenizer_output.loss_pixel.item() > 0  # the DC-AE teacher's latent fits the pixel projector
    assert latents.shape == (2, LATENT_CHANNELS, 4, 4)
    assert features.shape == (2, 16, 32)
    assert torch.isfinite(output.loss_flow)
    assert 0 < output.loss_align.item() < 2


def test_save_reload_reproduces_image(paper_pipeline, tmp_path):
    before = _generate(paper_pipeline)
    paper_pipeline.save_pretrained(tmp_path)
    written = {path.suffix for path in tmp_path.rglob("*") if path.is_file()}
    assert ".safetensors" in written
    assert not written & {".bin", ".pt", ".pth", ".ckpt"}

    loaded = SparPipeline.from_pretrained(tmp_path)
    np.testing.assert_array_equal(_generate(loaded), before)


# ----------------------------------------------------------------------------- example script


def _load_script():
    spec = importlib.util.spec_from_file_location("build_paper_model", REPO_ROOT / "examples" / "build_paper_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO_ROOT / "examples" / "build_paper_model.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def test_script_builds_loadable_folder(checkpoints, tmp_path):
    output = tmp_path / "spar-paper"
    result = _run_script(
        "--mllm", checkpoints["mllm_path"], "--dcae", checkpoints["dcae_path"], "--sana", checkpoints["sana_path"],
        "--output", str(output), "--num-queries", "4", "--align-layer", "2", "--connector-num-layers", "1",
    )
    assert result.returncode == 0, result.stderr
    assert (output / "model_index.json").is_file()
    assert (output / "model" / "model.safetensors").is_file()
    assert json.loads((output / "model" / "config.json").read_text())["num_queries"] == 4

    rejected = _run_script(
        "--mllm", checkpoints["mllm_path"], "--dcae", checkpoints["dcae_path"], "--sana", checkpoints["sana_path"],
        "--output", str(output),
    )
    assert rejected.returncode == 2
    assert "is not empty" in rejected.stderr
    assert (output / "model_index.json").is_file()


def test_script_overwrite_replaces_folder(paper_pipeline, tmp_path):
    output = tmp_path / "spar-paper"
    output.mkdir()
    (output / "stale.txt").write_text("from an earlier build")
    _load_script().write_pipeline(paper_pipeline, str(output))
    assert (output / "model_index.json").is_file()
    assert not (output / "stale.txt").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["spar-paper"]  # no staging folder left behind


def test_script_reports_bad_path(checkpoints, tmp_path, capsys):
    argv = ["--mllm", str(tmp_path / "absent"), "--dcae", checkpoints["dcae_path"], "--sana", checkpoints["sana_path"],
            "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        _load_script().main(argv)
    assert exit_info.value.code == 2
    assert "`mllm_path` must be a local folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
