import pytest
import torch
from transformers import AutoModel

from spar_hf import SparTokenizerConfig, SparTokenizerModel
from spar_hf.presets import preset_configs


def _images(batch=2, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes(tiny_tokenizer_model):
    latents = tiny_tokenizer_model.encode(_images()).latents
    assert latents.shape == (2, 4, 4, 4)
    assert tiny_tokenizer_model.decode(latents).sample.shape == (2, 3, 16, 16)


def test_encode_accepts_other_sizes_on_the_grid(tiny_tokenizer_model):
    assert tiny_tokenizer_model.encode(_images(size=24)).latents.shape == (2, 4, 6, 6)


def test_forward_returns_each_loss_and_their_weighted_sum(tiny_tokenizer_model):
    config = tiny_tokenizer_model.config
    out = tiny_tokenizer_model(_images())
    expected = out.loss_rec + config.pixel_loss_weight * out.loss_pixel + config.semantic_loss_weight * out.loss_sem
    assert torch.allclose(out.loss, expected)
    assert out.loss_pixel.item() > 0
    assert out.loss_sem.item() == 0  # encoder frozen: no L_s


def test_stage1_gradients_skip_frozen_encoder_and_teacher(tiny_tokenizer_model):
    tiny_tokenizer_model.train()
    tiny_tokenizer_model(_images()).loss.backward()
    grads = {n: p.grad for n, p in tiny_tokenizer_model.named_parameters()}
    frozen = [n for n in grads if n.startswith(("vision_encoder.", "pixel_teacher."))]
    trained = [n for n in grads if not n.startswith(("vision_encoder.", "pixel_teacher."))]
    assert frozen and all(grads[n] is None for n in frozen)
    assert all(grads[n] is not None for n in trained), [n for n in trained if grads[n] is None]


def test_stage2_trains_encoder_against_frozen_anchor():
    tokenizer_config, _ = preset_configs("tiny", tokenizer_train_vision_encoder=True, tokenizer_semantic_loss_weight=1.0)
    torch.manual_seed(0)
    model = SparTokenizerModel(tokenizer_config).train()
    assert torch.equal(model.vision_anchor.embeddings.patch_embedding.weight, model.vision_encoder.embeddings.patch_embedding.weight)
    with torch.no_grad():  # move the encoder away from its anchor so that L_s is non-zero
        weight = model.vision_encoder.embeddings.patch_embedding.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    out = model(_images())
    assert out.loss_sem.item() > 0
    out.loss.backward()
    assert model.vision_encoder.embeddings.patch_embedding.weight.grad is not None
    assert all(p.grad is None for p in model.vision_anchor.parameters())


def test_stage2_from_stage1_checkpoint_copies_anchor(tmp_path, tiny_tokenizer_model):
    with torch.no_grad():
        tiny_tokenizer_model.vision_encoder.embeddings.patch_embedding.weight.mul_(3)
    tiny_tokenizer_model.save_pretrained(tmp_path)
    stage2 = SparTokenizerModel.from_pretrained(tmp_path, train_vision_encoder=True, semantic_loss_weight=1.0)
    assert torch.equal(stage2.vision_anchor.embeddings.patch_embedding.weight, tiny_tokenizer_model.vision_encoder.embeddings.patch_embedding.weight)


def test_save_load_round_trip(tmp_path, tiny_tokenizer_model):
    tiny_tokenizer_model.config.scaling_factor = 0.7
    tiny_tokenizer_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = SparTokenizerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.scaling_factor == 0.7
    images = _images()
    assert torch.equal(loaded.encode(images).latents, tiny_tokenizer_model.encode(images).latents)
    assert isinstance(AutoModel.from_pretrained(tmp_path), SparTokenizerModel)


@pytest.mark.parametrize(
    "override, absent",
    [
        ({"tokenizer_use_pixel_stream": False}, ("pixel_embed", "pixel_teacher")),
        ({"tokenizer_use_semantic_stream": False}, ("semantic_head",)),
        ({"tokenizer_pixel_teacher_config": None}, ("pixel_teacher", "pixel_projector")),
    ],
)
def test_ablation_branches(override, absent):
    tokenizer_config, _ = preset_configs("tiny", **override)
    model = SparTokenizerModel(tokenizer_config)
    for name in absent:
        assert getattr(model, name) is None
    out = model(_images())
    assert out.latents.shape == (2, 4, 4, 4)
    assert torch.isfinite(out.loss)
    if "pixel_teacher" in absent:
        assert out.loss_pixel.item() == 0


def test_feature_loss_switch_changes_loss_rec():
    torch.manual_seed(0)
    with_feature = SparTokenizerModel(preset_configs("tiny")[0])
    torch.manual_seed(0)
    without = SparTokenizerModel(preset_configs("tiny", tokenizer_rec_feature_weight=0.0)[0])
    images = _images()
    assert with_feature(images).loss_rec.item() > without(images).loss_rec.item()


def test_vision_encoder_with_class_token():
    # InternVL's vision tower returns a class token before the patch grid.
    vision = {"model_type": "internvl_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": [16, 16], "patch_size": [4, 4]}
    tokenizer_config, _ = preset_configs("tiny", tokenizer_vision_config=vision)
    model = SparTokenizerModel(tokenizer_config)
    assert model.get_semantic_features(_images(), grid_size=2).shape == (2, 4, 32)
    assert model.encode(_images()).latents.shape == (2, 4, 4, 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"use_semantic_stream": False, "use_pixel_stream": False}, "At least one of"),
        ({"downsample_ratio": 8}, "`downsample_ratio` must equal"),
        ({"image_size": 30}, "`image_size` must be divisible"),
        ({"semantic_loss_weight": 1.0}, "needs `train_vision_encoder=True`"),
        ({"rec_l1_weight": -1.0}, "`rec_l1_weight` must be >= 0"),
        ({"pixel_hidden_size": 30}, "`pixel_hidden_size` must be divisible"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparTokenizerConfig(**kwargs)


def test_teacher_ratio_must_match():
    teacher = preset_configs("tiny")[0].pixel_teacher_config
    with pytest.raises(ValueError, match="The pixel teacher compresses by 2\\*\\*2"):
        SparTokenizerConfig(pixel_teacher_config=teacher, downsample_ratio=8,
                            decoder_config={"block_out_channels": (8, 8, 8, 8), "layers_per_block": (1, 1, 1, 1),
                                            "qkv_multiscales": ((), (), (), ())})


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 1, 16, 16), "shape \\(2, 1, 16, 16\\)"),
        (torch.zeros(2, 3, 15, 16), "divisible by `downsample_ratio`"),
        ([[0.0]], "Got list"),
    ],
)
def test_bad_pixel_values_rejected(tiny_tokenizer_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_tokenizer_model.encode(bad)


def test_bad_latents_rejected(tiny_tokenizer_model):
    with pytest.raises(ValueError, match="`latents` must be a tensor of shape \\(batch_size, 4, h, w\\)"):
        tiny_tokenizer_model.decode(torch.zeros(1, 3, 4, 4))


def test_frozen_parts_stay_frozen_after_loading(tmp_path, tiny_tokenizer_model):
    tiny_tokenizer_model.save_pretrained(tmp_path)
    stage1 = SparTokenizerModel.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in stage1.vision_encoder.parameters())
    assert not any(p.requires_grad for p in stage1.pixel_teacher.parameters())
    stage2 = SparTokenizerModel.from_pretrained(tmp_path, train_vision_encoder=True, semantic_loss_weight=1.0)
    assert all(p.requires_grad for p in stage2.vision_encoder.parameters())
    assert not any(p.requires_grad for p in stage2.vision_anchor.parameters())
    assert not any(p.requires_grad for p in stage2.pixel_teacher.parameters())
