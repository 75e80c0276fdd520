import os

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from test_generator import TINY_INTERNVL, TINY_LLAMA, _batch

from spar_hf import SparForConditionalGeneration
from spar_hf.lora import add_lora, default_target_modules, load_lora, lora_targets, merge_lora, save_lora
from spar_hf.presets import preset_configs

TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 100}


def _model(**generator_overrides):
    _, config = preset_configs("tiny", **{f"generator_{k}": v for k, v in generator_overrides.items()})
    torch.manual_seed(0)
    return SparForConditionalGeneration(config)


def _inputs():
    """`_batch()` plus fixed noise and sigmas, so two forwards of the same weights agree exactly."""
    batch = _batch()
    generator = torch.Generator().manual_seed(1)
    batch["noise"] = torch.randn(batch["latents"].shape, generator=generator)
    batch["sigmas"] = torch.tensor([0.2, 0.5, 0.8])
    return batch


def _randomize_lora(model, seed=0):
    """Give every LoRA B matrix random values, because peft starts them at zero and the adapters would change nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _adapted_modules(part):
    return [name for name, module in part.named_modules() if isinstance(module, BaseTunerLayer)]


@torch.no_grad()
def _outputs(model):
    out = model.eval()(**_inputs())
    return out.model_output, out.loss


def test_add_lora_rejects_unknown_target():
    with pytest.raises(ValueError, match=r"`target` must be one of \['mllm', 'transformer'\]. Got 'connector'"):
        add_lora(_model(), "connector")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r": 0}, "`r` must be an integer >= 1"), ({"alpha": 0}, "`alpha` must be > 0"), ({"dropout": 1.0}, "`dropout`")],
)
def test_add_lora_rejects_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(_model(), "transformer", **kwargs)


def test_add_lora_twice_raises():
    model = add_lora(_model(), "transformer")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, "transformer")


@pytest.mark.parametrize("target, other", [("mllm", "transformer"), ("transformer", "mllm")])
def test_lora_trains_only_adapters_of_target(target, other):
    model = add_lora(_model(), target)
    part_prefix, other_prefix = f"{target}.", f"{other}."
    params = dict(model.named_parameters())
    trainable_in_part = [n for n, p in params.items() if n.startswith(part_prefix) and p.requires_grad]
    assert trainable_in_part
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable_in_part)
    # The other part keeps what SparForConditionalGeneration set: a frozen MLLM, a trainable DiT.
    other_trainable = [p.requires_grad for n, p in params.items() if n.startswith(other_prefix)]
    assert all(other_trainable) if other == "transformer" else not any(other_trainable)
    for prefix in ("queries", "router.", "connector.", "align_projector."):
        assert all(p.requires_grad for n, p in params.items() if n.startswith(prefix)), prefix

    base_before = {n: p.detach().clone() for n, p in params.items() if n.startswith(part_prefix) and not p.requires_grad}
    lora_b_before = {n: p.detach().clone() for n, p in params.items() if ".lora_B." in n}
    model.train()
    torch.manual_seed(0)
    model(**_batch()).loss.backward()
    for name in trainable_in_part:
        assert params[name].grad is not None, name
    # lora_B starts at zero, so at step one only B gets a non-zero gradient (dL/dA is B^T times the rest).
    assert all(params[n].grad.abs().sum() > 0 for n in lora_b_before)
    assert all(params[n].grad is None for n in base_before)

    torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=1e-3).step()
    assert all(torch.equal(params[n], value) for n, value in base_before.items())
    assert all(not torch.equal(params[n], value) for n, value in lora_b_before.items())


def test_mllm_lora_follows_train_mode():
    model = add_lora(_model(), "mllm")
    assert model.config.train_mllm
    model.train()
    assert model.mllm.training
    model.eval()
    assert not model.mllm.training

    merge_lora(model)
    assert not model.config.train_mllm
    model.train()
    assert not model.mllm.training


def test_merged_mllm_is_saved_in_full(tmp_path):
    model = _model()
    # Only `from_pretrained` reads this path, and a merged MLLM must not depend on it.
    model.config.mllm_pretrained_path = str(tmp_path / "no_such_mllm")
    add_lora(model, "mllm")
    _randomize_lora(model)
    merge_lora(model)
    assert model.config.mllm_pretrained_path is None
    assert not any(p.requires_grad for p in model.mllm.parameters())
    expected, _ = _outputs(model)

    model.save_pretrained(tmp_path / "merged")
    reloaded = SparForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any(p.requires_grad for p in reloaded.mllm.parameters())
    assert torch.allclose(_outputs(reloaded)[0], expected, atol=1e-6)


@pytest.mark.parametrize(
    "mllm_config, target, suffixes, count, excluded_prefix",
    [
        (None, "mllm", ("query", "key", "value"), 9, None),  # 3 BERT layers x 3
        (TINY_LLAMA, "mllm", ("q_proj", "k_proj", "v_proj", "o_proj"), 8, None),  # 2 layers x 4
        (TINY_INTERNVL, "mllm", ("q_proj", "k_proj", "v_proj", "o_proj"), 8, "model.vision_tower."),
        (None, "transformer", ("to_q", "to_k", "to_v"), 12, None),  # 2 blocks x (self + cross) x 3
    ],
)
def test_default_target_modules_per_model(mllm_config, target, suffixes, count, excluded_prefix):
    model = _model() if mllm_config is None else _model(mllm_config=mllm_config)
    add_lora(model, target)
    adapted = _adapted_modules(getattr(model, target))
    assert len(adapted) == count
    assert all(name.rsplit(".", 1)[-1] in suffixes for name in adapted)
    if excluded_prefix is not None:
        assert not any(name.startswith(excluded_prefix) for name in adapted)
        assert all(name.startswith("model.language_model.") for name in adapted)


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # peft corrects it for GPT-2's Conv1D
def test_unknown_mllm_type_needs_target_modules():
    model = _model(mllm_config=TINY_GPT2)
    with pytest.raises(ValueError, match="No default LoRA `target_modules`.*'gpt2'"):
        default_target_modules(model, "mllm")
    add_lora(model, "mllm", target_modules=["c_attn"])
    assert len(_adapted_modules(model.mllm)) == 2


@pytest.mark.parametrize("target", ["mllm", "transformer"])
def test_checkpointing_keeps_lora_gradients(target):
    """With activation checkpointing the adapted layers run again in backward, and LoRA gradients stay the same."""

    def step(checkpointing):
        model = add_lora(_model(), target)
        _randomize_lora(model)  # a non-zero B gives lora_A a gradient too
        if checkpointing:
            # As `Trainer(gradient_checkpointing=True)` does: enables it on the MLLM's layers and on the DiT.
            model.activation_checkpointing_enable({"use_reentrant": False})
            assert model.transformer.gradient_checkpointing
        calls = []
        for module in getattr(model, target).modules():
            if isinstance(module, BaseTunerLayer):
                module.register_forward_hook(lambda *args: calls.append(1))
        model.train()
        torch.manual_seed(0)  # the same BERT dropout and condition dropout masks in both runs
        model(**_inputs()).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        return grads, len(calls), len(_adapted_modules(getattr(model, target)))

    plain, plain_calls, num_adapted = step(checkpointing=False)
    checkpointed, checkpointed_calls, _ = step(checkpointing=True)
    assert plain_calls == num_adapted
    assert checkpointed_calls == 2 * num_adapted  # recomputed in backward: checkpointing really ran
    assert plain.keys() == checkpointed.keys()
    for name, grad in checkpointed.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(grad, plain[name], atol=1e-6), name


@pytest.mark.parametrize("target", ["mllm", "transformer"])
def test_merge_matches_unmerged_outputs(tmp_path, target):
    model = _model()
    base_output, _ = _outputs(model)
    base_keys = set(model.state_dict())

    add_lora(model, target)
    _randomize_lora(model)
    lora_output, lora_loss = _outputs(model)
    assert (lora_output - base_output).abs().max() > 1e-3  # the adapters change the prediction

    merge_lora(model)
    merged_output, merged_loss = _outputs(model)
    assert (merged_output - lora_output).abs().max() < 1e-5
    assert abs(merged_loss.item() - lora_loss.item()) < 1e-5
    assert _adapted_modules(model) == []
    assert lora_targets(model) == []
    assert set(model.state_dict()) == base_keys

    model.save_pretrained(tmp_path)
    reloaded_output, _ = _outputs(SparForConditionalGeneration.from_pretrained(tmp_path))
    assert torch.allclose(reloaded_output, merged_output, atol=1e-6)


def test_lora_round_trips_through_disk(tmp_path):
    model = add_lora(add_lora(_model(), "mllm"), "transformer")
    _randomize_lora(model)
    expected_output, _ = _outputs(model)
    save_lora(model, tmp_path)

    for target in ("mllm", "transformer"):
        assert sorted(os.listdir(tmp_path / target)) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = _model()
    fresh_output, _ = _outputs(fresh)
    assert (fresh_output - expected_output).abs().max() > 1e-3
    load_lora(fresh, tmp_path)
    assert lora_targets(fresh) == ["mllm", "transformer"]
    assert fresh.config.train_mllm
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[n], saved[n]) and loaded[n].requires_grad for n in saved)
    loaded_output, _ = _outputs(fresh)
    assert torch.allclose(loaded_output, expected_output, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"target_modules": ["to_q"]}, "target_modules"), ({"r": 4}, "'r'"), ({"alpha": 32}, "lora_alpha")],
)
def test_load_lora_rejects_other_adapters(tmp_path, kwargs, field):
    save_lora(add_lora(_model(), "transformer"), tmp_path)
    model = add_lora(_model(), "transformer", **kwargs)
    with pytest.raises(ValueError, match=f"differs from the adapters of `model.transformer` in .*{field}"):
        load_lora(model, tmp_path)


def test_lora_io_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_lora(_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="No LoRA adapters found"):
        load_lora(_model(), tmp_path)
    with pytest.raises(ValueError, match="`model.mllm` has no LoRA adapters to merge"):
        merge_lora(_model(), "mllm")
