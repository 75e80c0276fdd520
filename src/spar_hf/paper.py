"""The paper configuration: SPAR built from local InternVL3-hf, DC-AE and SANA checkpoints.

These are the parts of the SPAR paper ("Semantic-Pixel Self-Alignment and Adaptive Routing for Unified
Multimodal Models", ECCV 2026). SPAR-1B pairs InternVL3-1B-hf with the DC-AE f32c32 autoencoder and a
SANA DiT, and SPAR-3B uses InternVL3-2B-hf and SANA-1.6B. Each pretrained part keeps its own class and
weights:

- the MLLM is the frozen language backbone, and its vision tower is the tokenizer's semantic encoder;
- the DC-AE is the pixel latent teacher of `L_p`, and its decoder initialises the tokenizer's decoder;
- the SANA transformer is the DiT.

Everything else (queries, DTR, connector, alignment projector, pixel stream, fusion) starts from
random weights. Paths are local folders; nothing is downloaded.
"""

import copy
import inspect
import os

from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    ImageProcessingMixin,
    PretrainedConfig,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils import logging

from .generator import SparConfig, SparForConditionalGeneration
from .pipeline import SparPipeline
from .tokenizer import SparTokenizerConfig, SparTokenizerModel

logger = logging.get_logger(__name__)

OVERRIDE_PREFIXES = {"tokenizer_": SparTokenizerConfig, "generator_": SparConfig}


def _component_folder(path: str | os.PathLike, argument: str, subfolder: str | None, expected: str) -> str:
    """Return the folder that contains a component's config.json: `path` itself, or `path/subfolder` of a pipeline folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        state = "is a file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"`{argument}` must be a local folder with {expected}. Got {path!r}, which {state}.")
    candidates = [path] if subfolder is None else [path, os.path.join(path, subfolder)]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    where = "config.json" if subfolder is None else f"config.json or {subfolder}/config.json"
    raise ValueError(f"`{argument}` {path!r} has no {where}; pass the local folder of {expected}.")


def _resolve_folders(mllm_path, dcae_path, sana_path) -> tuple[str, str, str]:
    mllm_folder = _component_folder(mllm_path, "mllm_path", None, "an InternVL3-hf checkpoint (or another MLLM with a vision tower)")
    dcae_folder = _component_folder(dcae_path, "dcae_path", "vae", "a diffusers `AutoencoderDC` (DC-AE) checkpoint")
    sana_folder = _component_folder(sana_path, "sana_path", "transformer", "a diffusers `SanaTransformer2DModel` checkpoint")
    return mllm_folder, dcae_folder, sana_folder


def _diffusers_init_config(model_class, folder: str, argument: str) -> dict:
    """Read a diffusers model config and return every `__init__` argument: saved values, else the class defaults.

    A complete config matters because `SparConfig` fills missing DiT fields with its own tiny defaults.
    """
    saved = model_class.load_config(folder)
    if saved.get("_class_name") != model_class.__name__:
        raise ValueError(
            f"`{argument}` {folder!r} contains a config for {saved.get('_class_name', 'no diffusers class')!r}; "
            f"pass the folder of a diffusers `{model_class.__name__}` checkpoint."
        )
    init_arguments, _, _ = model_class.extract_init_dict(saved)
    signature = inspect.signature(model_class.__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    return {**defaults, **init_arguments}


def _mllm_config(folder: str) -> PretrainedConfig:
    """Read the MLLM config and clear its stored dtype, so the MLLM is built in the same dtype as the rest of SPAR."""
    config = copy.deepcopy(AutoConfig.from_pretrained(folder))
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or getattr(config, "vision_config", None) is None:
        raise ValueError(
            f"`mllm_path` {folder!r} contains a {config.model_type!r} config, which is not an image-text-to-text model "
            "with a vision tower in transformers; pass an InternVL3-hf checkpoint, whose vision tower is the semantic encoder."
        )
    # InternVL3-hf configs store bfloat16, which `from_config` would apply to the MLLM alone and so mix dtypes.
    for sub_config in (config, config.get_text_config(), config.vision_config):
        sub_config.dtype = None
    return config


def _square_side(size, argument: str) -> int:
    sides = [size] if isinstance(size, int) else list(size)
    if len(set(sides)) != 1:
        raise ValueError(f"`{argument}` must describe a square image for the semantic stream. Got {size!r}.")
    return int(sides[0])


def _vision_normalisation(folder: str) -> tuple[list[float], list[float]]:
    """Return the mean and std of the MLLM's image processor config, or ImageNet's (InternVL's own) when it has none."""
    try:
        processor_config, _ = ImageProcessingMixin.get_image_processor_dict(folder, local_files_only=True)
    except OSError:
        logger.info("No image processor config in %s; normalising vision inputs with the ImageNet mean and std.", folder)
        return list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    mean = processor_config.get("image_mean", IMAGENET_DEFAULT_MEAN)
    std = processor_config.get("image_std", IMAGENET_DEFAULT_STD)
    return list(mean), list(std)


def _decoder_config(dcae: dict) -> dict:
    """Mirror the DC-AE decoder in the tokenizer's `decoder_config`, so the DC-AE decoder weights load into it."""
    return {
        "block_out_channels": list(dcae["decoder_block_out_channels"]),
        "layers_per_block": list(dcae["decoder_layers_per_block"]),
        "block_types": dcae["decoder_block_types"],
        "norm_types": dcae["decoder_norm_types"],
        "act_fns": dcae["decoder_act_fns"],
        "qkv_multiscales": [list(scales) for scales in dcae["decoder_qkv_multiscales"]],
        "attention_head_dim": dcae["attention_head_dim"],
        "upsample_block_type": dcae["upsample_block_type"],
        "in_shortcut": dcae["decoder_in_shortcut"],
        "conv_act_fn": dcae["decoder_conv_act_fn"],
    }


def _config_fields(config_class) -> set[str]:
    return set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}


def _split_overrides(overrides: dict) -> tuple[dict, dict]:
    """Split `tokenizer_<field>` / `generator_<field>` keyword arguments, rejecting unknown fields."""
    sides = {"tokenizer_": {}, "generator_": {}}
    for key, value in overrides.items():
        prefix = next((p for p in OVERRIDE_PREFIXES if key.startswith(p)), None)
        field = key[len(prefix):] if prefix else ""
        if prefix is None or field not in _config_fields(OVERRIDE_PREFIXES[prefix]):
            raise TypeError(
                f"Unknown keyword argument {key!r}: a configuration override is 'tokenizer_<field>' or 'generator_<field>' "
                "with a field of `SparTokenizerConfig` or `SparConfig`, e.g. tokenizer_pixel_num_layers=4."
            )
        sides[prefix][field] = value
    return sides["tokenizer_"], sides["generator_"]


def _check_shapes(dcae: dict, sana: dict, align_layer: int, image_size: int, dcae_folder: str, sana_folder: str) -> None:
    latent_channels = dcae["latent_channels"]
    if dcae["in_channels"] != 3:
        raise ValueError(
            f"`dcae_path` {dcae_folder!r} encodes {dcae['in_channels']} image channels; SPAR decodes RGB, so pass a DC-AE "
            "with in_channels=3."
        )
    dit_out_channels = sana["out_channels"] or sana["in_channels"]
    if sana["in_channels"] != latent_channels or dit_out_channels != latent_channels:
        raise ValueError(
            f"`sana_path` {sana_folder!r} has in_channels={sana['in_channels']} and out_channels={dit_out_channels}, but the "
            f"DC-AE at {dcae_folder!r} has latent_channels={latent_channels}; pass a SANA DiT trained on that latent "
            "(SANA pairs with DC-AE f32c32, 32 channels)."
        )
    if not 1 <= align_layer <= sana["num_layers"]:
        raise ValueError(
            f"`align_layer` must be in [1, {sana['num_layers']}], the blocks of the DiT at {sana_folder!r}. Got {align_layer}."
        )
    multiple = 2 ** (len(dcae["encoder_block_out_channels"]) - 1) * sana["patch_size"]
    if image_size <= 0 or image_size % multiple != 0:
        raise ValueError(
            f"`image_size` must be a positive multiple of {multiple} (the DC-AE ratio times the DiT patch size). Got {image_size}."
        )


def paper_configs(
    mllm_path: str | os.PathLike,
    dcae_path: str | os.PathLike,
    sana_path: str | os.PathLike,
    num_queries: int = 256,
    routing_layers: list[int] | None = None,
    connector_num_layers: int = 6,
    align_layer: int = 8,
    align_projector_dim: int = 2048,
    image_size: int | None = None,
    flow_shift: float = 3.0,
    **overrides,
) -> tuple[SparTokenizerConfig, SparConfig]:
    r"""Build the paper's `(SparTokenizerConfig, SparConfig)` from the configs of three local checkpoints.

    Only config files are read; [`build_paper_pipeline`] loads the weights.

    Args:
        mllm_path: Folder of an InternVL3-hf checkpoint (`config.json`, weights, tokenizer).
        dcae_path: Folder of a diffusers `AutoencoderDC`, or of a diffusers pipeline with it in `vae/`.
        sana_path: Folder of a diffusers `SanaTransformer2DModel`, or of a pipeline with it in `transformer/`.
        num_queries: Learnable query tokens read by the MLLM.
        routing_layers: MLLM `hidden_states` indices DTR mixes; default every transformer layer.
        connector_num_layers: Bidirectional transformer layers between DTR and the DiT.
        align_layer: 1-based DiT block aligned with the tokenizer's semantic features.
        align_projector_dim: Hidden width of the alignment projector (2048 in REPA).
        image_size: Training and default sampling resolution; default the DiT's `sample_size` in pixels.
        flow_shift: Sigma shift shared by training and the scheduler.
        **overrides: `tokenizer_<field>` or `generator_<field>` to set any other field of either config.

    Raises:
        ValueError: A path is not a checkpoint folder of the expected kind, or the checkpoints disagree
            (DiT channels against the DC-AE latent, `align_layer` against the DiT depth).
        TypeError: An override names no field of either config.
    """
    # NOTE: the default flow_shift 3.0 is an assumption, not a published SPAR value, so re-tune it per resolution.
    tokenizer_overrides, generator_overrides = _split_overrides(overrides)
    mllm_folder, dcae_folder, sana_folder = _resolve_folders(mllm_path, dcae_path, sana_path)
    mllm = _mllm_config(mllm_folder)
    dcae = _diffusers_init_config(AutoencoderDC, dcae_folder, "dcae_path")
    sana = _diffusers_init_config(SanaTransformer2DModel, sana_folder, "sana_path")

    ratio = 2 ** (len(dcae["encoder_block_out_channels"]) - 1)
    image_size = sana["sample_size"] * sana["patch_size"] * ratio if image_size is None else image_size
    _check_shapes(dcae, sana, align_layer, image_size, dcae_folder, sana_folder)

    vision = copy.deepcopy(mllm.vision_config)
    mean, std = _vision_normalisation(mllm_folder)
    tokenizer = {
        "vision_config": vision,
        "vision_image_size": _square_side(vision.image_size, "vision_config.image_size"),
        "vision_image_mean": mean,
        "vision_image_std": std,
        "pixel_teacher_config": dcae,
        "image_size": image_size,
        "downsample_ratio": ratio,
        "latent_channels": dcae["latent_channels"],
        "semantic_channels": dcae["latent_channels"],
        "pixel_hidden_size": vision.hidden_size,
        "pixel_num_heads": vision.num_attention_heads,
        "decoder_config": _decoder_config(dcae),
        # NOTE: this is the DC-AE's scale for its own latent, so re-estimate it once the fused latent is trained.
        "scaling_factor": dcae["scaling_factor"],
    }
    generator = {
        "mllm_config": mllm,
        "mllm_head": "image_text_to_text",
        "num_queries": num_queries,
        "routing_layers": routing_layers,
        "connector_num_layers": connector_num_layers,
        "connector_num_heads": mllm.get_text_config().num_attention_heads,
        "transformer_config": sana,
        "align_layer": align_layer,
        "align_projector_dim": align_projector_dim,
        "align_feature_dim": vision.hidden_size,
        "flow_shift": flow_shift,
    }
    return SparTokenizerConfig(**{**tokenizer, **tokenizer_overrides}), SparConfig(**{**generator, **generator_overrides})


def _copy_weights(target: nn.Module, source: nn.Module, component: str, path: str) -> None:
    """Copy `source`'s state dict into `target`, raising `ValueError` unless every name and shape matches."""
    target_state, source_state = target.state_dict(), source.state_dict()
    missing = sorted(target_state.keys() - source_state.keys())
    unexpected = sorted(source_state.keys() - target_state.keys())
    reshaped = [
        f"{name} {tuple(source_state[name].shape)} vs {tuple(target_state[name].shape)}"
        for name in sorted(target_state.keys() & source_state.keys())
        if source_state[name].shape != target_state[name].shape
    ]
    problems = [
        f"{len(names)} {kind} (e.g. {names[:3]})"
        for kind, names in (("missing", missing), ("unexpected", unexpected), ("with another shape", reshaped))
        if names
    ]
    if problems:
        raise ValueError(
            f"The weights from {path!r} do not fit `{component}`: {', '.join(problems)}. "
            f"Build `{component}` from this checkpoint's own config, so leave its fields out of the overrides."
        )
    target.load_state_dict(source_state, strict=True)


def _load_processor(folder: str):
    """Load the MLLM's processor; without one (or without its dependencies), its tokenizer."""
    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, ImportError, TypeError) as error:
        logger.warning(
            "Could not load a processor from %s (%s: %s); using its tokenizer, so the pipeline reads text only and "
            "cannot edit images.", folder, type(error).__name__, error,
        )
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _count(module: nn.Module | None) -> str:
    return f"{0 if module is None else sum(p.numel() for p in module.parameters()):,}"


def _log_parameter_counts(model: SparForConditionalGeneration, vae: SparTokenizerModel) -> None:
    new_layers = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("mllm.", "transformer.")))
    logger.info(
        "Built SPAR's paper configuration. Parameters: MLLM %s (vision tower %s), DiT %s, SPAR's new generator layers "
        "%s, tokenizer %s (pixel teacher %s).",
        _count(model.mllm), _count(vae.vision_encoder), _count(model.transformer), f"{new_layers:,}",
        _count(vae), _count(vae.pixel_teacher),
    )


def build_paper_pipeline(
    mllm_path: str | os.PathLike, dcae_path: str | os.PathLike, sana_path: str | os.PathLike, **config_overrides
) -> SparPipeline:
    r"""Build a [`SparPipeline`] in the paper configuration and load the pretrained weights of its three parts.

    The MLLM weights go into `model.mllm`, and its vision tower into the tokenizer's `vision_encoder` (also
    into the frozen anchor when the encoder trains). The DC-AE goes into the tokenizer's `pixel_teacher`, and
    its decoder into the tokenizer's `decoder`. SANA goes into `model.transformer`. Every copy is strict.
    The new SPAR layers are random, so call `transformers.set_seed` first to make them reproducible. The
    models are float32 and in eval mode; cast them with `pipe.to(dtype)`.

    Args:
        mllm_path, dcae_path, sana_path: Local checkpoint folders, as in [`paper_configs`].
        **config_overrides: Keyword arguments of [`paper_configs`].

    Raises:
        ValueError: For the configuration errors of [`paper_configs`], or when a checkpoint's weights do not
            fit the module built from the configuration.
    """
    tokenizer_config, generator_config = paper_configs(mllm_path, dcae_path, sana_path, **config_overrides)
    mllm_folder, dcae_folder, sana_folder = _resolve_folders(mllm_path, dcae_path, sana_path)
    model = SparForConditionalGeneration(generator_config)
    vae = SparTokenizerModel(tokenizer_config)

    mllm = AutoModelForImageTextToText.from_pretrained(mllm_folder, local_files_only=True)
    _copy_weights(model.mllm, mllm, "model.mllm", mllm_folder)
    vision_tower = mllm.get_encoder(modality="image")
    if vision_tower is mllm:
        raise ValueError(
            f"`mllm_path` {mllm_folder!r}: transformers found no vision tower in {type(mllm).__name__}, so it cannot "
            "provide the semantic encoder; pass an InternVL3-hf checkpoint."
        )
    _copy_weights(vae.vision_encoder, vision_tower, "vae.vision_encoder", mllm_folder)
    if vae.vision_anchor is not None:
        _copy_weights(vae.vision_anchor, vision_tower, "vae.vision_anchor", mllm_folder)
    del mllm, vision_tower

    dcae = AutoencoderDC.from_pretrained(dcae_folder, local_files_only=True)
    if vae.pixel_teacher is not None:
        _copy_weights(vae.pixel_teacher, dcae, "vae.pixel_teacher", dcae_folder)
    _copy_weights(vae.decoder, dcae.decoder, "vae.decoder", dcae_folder)
    del dcae

    sana = SanaTransformer2DModel.from_pretrained(sana_folder, local_files_only=True)
    _copy_weights(model.transformer, sana, "model.transformer", sana_folder)
    del sana

    _log_parameter_counts(model, vae)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=generator_config.flow_shift)
    processor = _load_processor(mllm_folder)
    return SparPipeline(model=model.eval(), vae=vae.eval(), scheduler=scheduler, processor=processor)
