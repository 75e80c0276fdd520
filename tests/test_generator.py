import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from spar_hf import SparConfig, SparForConditionalGeneration
from spar_hf.presets import preset_configs

TINY_INTERNVL = {
    "model_type": "internvl",
    "vision_config": {"model_type": "internvl_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "image_size": [16, 16], "patch_size": [4, 4]},
    "text_config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 200},
    "image_token_id": 199,
}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100}


def _batch(batch=3, length=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 40, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, 4:] = 0
    latents = torch.randn(batch, 4, 4, 4, generator=generator)
    features = torch.randn(batch, 16, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "latents": latents, "semantic_features": features}


def test_dtr_entropy_and_gate_at_initialisation(tiny_generator):
    out = tiny_generator(**_batch())
    # The router starts uniform over the 3 layers while the zero gate keeps the output on the last one.
    assert out.routing_entropy.item() == pytest.approx(math.log(3), abs=1e-6)
    assert out.routing_gate.item() == 0
    assert torch.equal(out.routing_weights[..., -1], torch.ones(3, 4))


def test_forward_losses_and_shapes(tiny_generator):
    out = tiny_generator(**_batch())
    assert out.model_output.shape == (3, 4, 4, 4)
    assert out.routing_weights.shape == (3, 4, 3)  # (B, Q, K): routing over the 3 BERT layers
    assert torch.allclose(out.loss, out.loss_flow + 0.5 * out.loss_align)
    assert 0 < out.loss_align.item() < 2


def test_gradients_reach_exactly_the_trainable_parts(tiny_generator):
    tiny_generator.train()
    torch.manual_seed(0)
    tiny_generator(**_batch()).loss.backward()
    params = dict(tiny_generator.named_parameters())
    mllm = [n for n in params if n.startswith("mllm.")]
    assert mllm and all(params[n].grad is None and not params[n].requires_grad for n in mllm)
    for prefix in ("queries", "router.", "connector.", "transformer.", "align_projector."):
        names = [n for n in params if n.startswith(prefix)]
        assert names and all(params[n].grad is not None for n in names), prefix
    # The gate starts at zero: its gradient is non-zero, so routing leaves the last layer at once.
    assert params["router.gate"].grad.abs().item() > 0


def test_frozen_mllm_stays_in_eval_mode(tiny_generator):
    tiny_generator.train()
    assert tiny_generator.transformer.training
    assert not tiny_generator.mllm.training


def test_condition_independent_of_padding(tiny_generator):
    batch = _batch()
    padded, _ = tiny_generator.encode_condition(batch["input_ids"], batch["attention_mask"])
    alone, _ = tiny_generator.encode_condition(batch["input_ids"][:1, :4])
    assert torch.allclose(padded[:1], alone, atol=1e-5)


def test_condition_dropout_uses_null_condition(tiny_configs):
    _, config = preset_configs("tiny", generator_cond_dropout_prob=0.99, generator_align_loss_weight=0.0)
    torch.manual_seed(0)
    model = SparForConditionalGeneration(config).train()
    batch = _batch()
    batch.pop("semantic_features")
    model(**batch).loss.backward()
    assert model.null_condition.grad is not None
    assert model.null_condition.grad.abs().sum() > 0


def test_alignment_off_branch():
    _, config = preset_configs("tiny", generator_align_loss_weight=0.0)
    model = SparForConditionalGeneration(config)
    assert model.align_projector is None
    batch = _batch()
    batch.pop("semantic_features")
    out = model(**batch)
    assert out.loss_align.item() == 0
    assert torch.equal(out.loss, out.loss_flow)


def test_alignment_needs_features(tiny_generator):
    batch = _batch()
    batch.pop("semantic_features")
    with pytest.raises(ValueError, match="`semantic_features` are required"):
        tiny_generator(**batch)


def test_alignment_feature_grid_mismatch(tiny_generator):
    batch = _batch()
    batch["semantic_features"] = torch.randn(3, 9, 32)
    with pytest.raises(ValueError, match="has 9 tokens but the DiT has 16"):
        tiny_generator(**batch)


def test_alignment_hook_captures_only_in_forward(tiny_generator):
    batch = _batch()
    tiny_generator(**batch)
    condition, _ = tiny_generator.encode_condition(batch["input_ids"])
    tiny_generator.transformer(batch["latents"], encoder_hidden_states=condition, timestep=torch.ones(3))
    assert tiny_generator._aligned_states is None


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_routing_ablation_modes(mode):
    _, config = preset_configs("tiny", generator_routing_mode=mode)
    model = SparForConditionalGeneration(config)
    out = model(**_batch())
    assert out.routing_entropy.item() == pytest.approx(math.log(3) if mode == "mean" else 0.0, abs=1e-6)
    assert out.routing_gate is None
    expected = torch.full((3,), 1 / 3) if mode == "mean" else torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(out.routing_weights[0, 0], expected)


def test_custom_routing_layers():
    _, config = preset_configs("tiny", generator_routing_layers=[0, 3])
    out = SparForConditionalGeneration(config)(**_batch())
    assert out.routing_weights.shape[-1] == 2


def test_softmax_self_attention_survives_save_and_load(tmp_path):
    _, config = preset_configs("tiny", generator_dit_self_attention="softmax")
    torch.manual_seed(0)
    model = SparForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    loaded = SparForConditionalGeneration.from_pretrained(tmp_path).eval()
    linear = SparForConditionalGeneration(preset_configs("tiny")[1]).eval()
    linear.load_state_dict(model.state_dict())
    batch = _batch()
    noise, sigmas = torch.randn_like(batch["latents"]), torch.full((3,), 0.3)
    loss = model(**batch, noise=noise, sigmas=sigmas).loss
    assert torch.equal(loaded(**batch, noise=noise, sigmas=sigmas).loss, loss)
    # Same weights, other attention: only the processor differs, so the loss must too.
    assert not torch.allclose(linear(**batch, noise=noise, sigmas=sigmas).loss, loss)


def test_loaded_buffers_match_a_fresh_model(tmp_path):
    tiny_sana = preset_configs("tiny")[1].transformer_config
    _, config = preset_configs("tiny", generator_transformer_config={**tiny_sana, "interpolation_scale": 1.0})
    model = SparForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    loaded = SparForConditionalGeneration.from_pretrained(tmp_path)
    fresh = dict(model.named_buffers())
    # The sin-cos position table is not in the checkpoint, so loading must rebuild it.
    assert fresh["transformer.patch_embed.pos_embed"].abs().sum() > 0
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, fresh[name]), name


def test_save_load_round_trip(tmp_path, tiny_generator):
    tiny_generator.save_pretrained(tmp_path)
    loaded = SparForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = _batch()
    noise, sigmas = torch.randn_like(batch["latents"]), torch.full((3,), 0.3)
    assert torch.equal(loaded(**batch, noise=noise, sigmas=sigmas).loss, tiny_generator(**batch, noise=noise, sigmas=sigmas).loss)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SparForConditionalGeneration)


def test_frozen_mllm_weights_come_from_pretrained_path(tmp_path, tiny_configs):
    torch.manual_seed(0)
    mllm_dir, model_dir = tmp_path / "mllm", tmp_path / "spar"
    _, config = tiny_configs
    config.mllm_pretrained_path = str(mllm_dir)
    model = SparForConditionalGeneration(config)
    model.mllm.save_pretrained(mllm_dir)
    model.save_pretrained(model_dir)
    assert not any(k.startswith("mllm.") for k in load_file(model_dir / "model.safetensors"))
    loaded = SparForConditionalGeneration.from_pretrained(model_dir)
    assert torch.equal(loaded.mllm.embeddings.word_embeddings.weight, model.mllm.embeddings.word_embeddings.weight)


def test_missing_mllm_weights_without_path_rejected(tmp_path, tiny_generator):
    state = {k: v for k, v in tiny_generator.state_dict().items() if not k.startswith("mllm.")}
    tiny_generator.save_pretrained(tmp_path, state_dict=state)
    with pytest.raises(ValueError, match="`mllm_pretrained_path` is not set"):
        SparForConditionalGeneration.from_pretrained(tmp_path)


def test_internvl_mllm_with_image():
    _, config = preset_configs("tiny", generator_mllm_config=TINY_INTERNVL)
    model = SparForConditionalGeneration(config).eval()
    assert type(model.mllm).__name__ == "InternVLForConditionalGeneration"
    ids = torch.cat([torch.full((2, 4), 199), torch.randint(1, 150, (2, 5))], dim=1)  # 4 image tokens, then text
    with_image, _ = model.encode_condition(ids, pixel_values=torch.randn(2, 3, 16, 16))
    other_image, _ = model.encode_condition(ids, pixel_values=torch.randn(2, 3, 16, 16))
    assert with_image.shape == (2, 4, 32)
    assert not torch.allclose(with_image, other_image)


def test_generate_keeps_mllm_text_generation():
    _, config = preset_configs("tiny", generator_mllm_config=TINY_INTERNVL)
    model = SparForConditionalGeneration(config).eval()
    ids = torch.randint(1, 150, (1, 5))
    ours = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    theirs = model.mllm.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert ours.shape == (1, 8)
    assert torch.equal(ours, theirs)


def test_causal_lm_head():
    _, config = preset_configs("tiny", generator_mllm_config=TINY_LLAMA, generator_mllm_head="causal_lm",
                               generator_connector_num_heads=2)
    model = SparForConditionalGeneration(config)
    assert type(model.mllm).__name__ == "LlamaForCausalLM"
    assert model(**_batch()).loss.isfinite()


def test_generate_rejected_without_lm_head(tiny_generator):
    with pytest.raises(ValueError, match="has no language-model head"):
        tiny_generator.generate(input_ids=torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"mllm_head": "seq2seq"}, "`mllm_head` must be one of"),
        ({"routing_mode": "max"}, "`routing_mode` must be one of"),
        ({"routing_layers": [2, 1]}, "`routing_layers` must be a non-empty ascending list"),
        ({"routing_layers": [1, 9]}, "indices in \\[0, 3\\]"),
        ({"num_queries": 0}, "`num_queries` must be >= 1"),
        ({"connector_num_heads": 5}, "must be divisible by `connector_num_heads`"),
        ({"align_layer": 3}, "`align_layer` must be in \\[1, 2\\]"),
        ({"align_loss_weight": -1.0}, "`align_loss_weight` must be >= 0"),
        ({"cond_dropout_prob": 1.0}, "`cond_dropout_prob` must be in \\[0, 1\\)"),
        ({"flow_shift": 0.0}, "`flow_shift` must be > 0"),
        ({"dit_self_attention": "flash"}, "`dit_self_attention` must be one of"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ValueError, match=message):
        preset_configs("tiny", **{f"generator_{k}": v for k, v in override.items()})


def test_config_round_trip_keeps_sub_config(tmp_path, tiny_configs):
    _, config = tiny_configs
    config.save_pretrained(tmp_path)
    loaded = SparConfig.from_pretrained(tmp_path)
    assert loaded.mllm_config.model_type == "bert"
    assert loaded.routing_layers == [1, 2, 3]
    assert loaded.transformer_config["num_layers"] == 2


def test_mllm_stays_frozen_after_loading(tmp_path, tiny_generator):
    tiny_generator.save_pretrained(tmp_path)
    loaded = SparForConditionalGeneration.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.mllm.parameters())
    assert all(p.requires_grad for p in loaded.transformer.parameters())
