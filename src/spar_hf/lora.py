"""LoRA adapters on SPAR's MLLM or DiT, built with peft.

`add_lora(model, "mllm")` or `add_lora(model, "transformer")` injects LoRA layers into
`model.mllm` or `model.transformer` in place with `peft.inject_adapter_in_model`, the function
that peft offers (in `peft.functional`) for integrations with models that are not a `PeftModel`.
`peft.get_peft_model` is not used because it would replace `model.mllm` with a `PeftModel`
wrapper. The wrapper renames every parameter, and its `base_model` is a peft tuner rather than
the transformers model that `encode_condition` calls. The `add_adapter` methods of transformers
and diffusers models wrap the same peft function, but the one in transformers 5.25 rejects peft
versions below 0.22 (0.21.2 is installed). Both parts therefore go through peft directly.

Adapters live outside the model's own checkpoint: `save_lora` writes one peft adapter folder per
part (`adapter_config.json` and `adapter_model.safetensors`), `load_lora` reads it back, and
`merge_lora` folds the adapters into the base weights. Merge before `save_pretrained`, because
the state dict of an unmerged model uses peft's names (`...query.base_layer.weight`) and
`from_pretrained` would not find its base weights.
"""

import os
import re

from peft import LoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging

from .generator import SparForConditionalGeneration

logger = logging.get_logger(__name__)

LORA_TARGETS = ("mllm", "transformer")
ADAPTER_NAME = "default"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# Attention projections adapted by default, keyed by the model type of the MLLM's text model.
MLLM_ATTENTION_PROJECTIONS = {
    "bert": ("query", "key", "value"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
# Query, key and value of both the linear self-attention and the cross-attention of every SANA block.
TRANSFORMER_ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v")


def add_lora(
    model: SparForConditionalGeneration,
    target: str,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
) -> SparForConditionalGeneration:
    """Inject LoRA adapters into `model.mllm` or `model.transformer` in place and return `model`.

    Within that part only the adapters are trainable afterwards. The rest of SPAR (queries,
    router, connector, alignment projector, and the other part) keeps its `requires_grad`.

    For `target="mllm"` this also sets `model.config.train_mllm = True` until `merge_lora`. The
    MLLM then follows `model.train()` like any trained module, so LoRA dropout, the MLLM's own
    dropout and activation checkpointing apply (transformers checkpoints layers only in training mode).

    Args:
        model: The SPAR generator.
        target (`str`): `"mllm"` or `"transformer"` (the SANA DiT).
        r (`int`): Rank of each adapter.
        alpha (`int`): LoRA scaling numerator. The update is scaled by `alpha / r`.
        dropout (`float`): Dropout on the adapter input, in [0, 1).
        target_modules (`list[str]`, *optional*): Module names to adapt, matched by peft as exact
            names or name suffixes within the part. By default the attention projections: for the
            MLLM those of its text model only, for the DiT `to_q`, `to_k`, `to_v`.
    """
    _check_target(target)
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` must be an integer >= 1. Got {r!r}.")
    if alpha <= 0:
        raise ValueError(f"`alpha` must be > 0. Got {alpha!r}.")
    if not 0 <= dropout < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Got {dropout!r}.")

    if target_modules is None:
        target_modules = default_target_modules(model, target)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules)
    _inject(model, target, config)
    return model


def default_target_modules(model: SparForConditionalGeneration, target: str) -> list[str] | str:
    """Return the attention projections that `add_lora` adapts when `target_modules` is not given.

    For the MLLM this is a regular expression over module names, restricted to its text model, so
    an MLLM's vision tower (InternVL's has `q_proj` too) keeps its weights.
    """
    _check_target(target)
    if target == "transformer":
        return list(TRANSFORMER_ATTENTION_PROJECTIONS)

    model_type = model.config.mllm_config.get_text_config().model_type
    if model_type not in MLLM_ATTENTION_PROJECTIONS:
        raise ValueError(
            f"No default LoRA `target_modules` for an MLLM whose text model is {model_type!r}. Known types are "
            f"{sorted(MLLM_ATTENTION_PROJECTIONS)}. Pass the attention projection names, e.g. "
            "`target_modules=['q_proj', 'v_proj']`."
        )
    names = "|".join(MLLM_ATTENTION_PROJECTIONS[model_type])
    prefix = _text_model_prefix(model.mllm)
    # peft full-matches a string `target_modules` against each module name within `model.mllm`.
    return rf"{re.escape(prefix)}\..*\.({names})" if prefix else rf".*\.({names})"


def lora_targets(model: SparForConditionalGeneration) -> list[str]:
    """Return the parts of `model` (`"mllm"`, `"transformer"`) that contain LoRA layers."""
    return [target for target in LORA_TARGETS if _has_adapters(getattr(model, target))]


def save_lora(model: SparForConditionalGeneration, save_directory: str | os.PathLike) -> None:
    """Save the adapters of each adapted part to `save_directory/<part>/` in peft's folder layout.

    Each folder contains `adapter_config.json` and `adapter_model.safetensors`, whose keys are
    module names within the part without the adapter name (`encoder.layer.0.attention.self.query.lora_A.weight`).
    """
    targets = lora_targets(model)
    if not targets:
        raise ValueError("The model has no LoRA adapters to save. Add them with `add_lora` or `load_lora` first.")

    for target in targets:
        part = getattr(model, target)
        folder = os.path.join(save_directory, target)
        os.makedirs(folder, exist_ok=True)
        state_dict = get_peft_model_state_dict(part, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
        state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
        save_file(state_dict, os.path.join(folder, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        part.peft_config[ADAPTER_NAME].save_pretrained(folder)
        logger.info("Saved %d LoRA tensors of `%s` to %s", len(state_dict), target, folder)


def load_lora(model: SparForConditionalGeneration, load_directory: str | os.PathLike) -> SparForConditionalGeneration:
    """Load adapters written by `save_lora` into `model` and return it.

    A part without adapters gets them injected from the saved `adapter_config.json` first, as
    `add_lora` would. A part that already has adapters must have the same adapted modules and ranks.
    """
    targets = [t for t in LORA_TARGETS if os.path.isfile(os.path.join(load_directory, t, ADAPTER_CONFIG_NAME))]
    if not targets:
        raise FileNotFoundError(
            f"No LoRA adapters found in {os.fspath(load_directory)!r}: expected `mllm/{ADAPTER_CONFIG_NAME}` or "
            f"`transformer/{ADAPTER_CONFIG_NAME}` there, as `save_lora` writes them."
        )

    for target in targets:
        folder = os.path.join(load_directory, target)
        part = getattr(model, target)
        saved_config = LoraConfig.from_pretrained(folder)
        if _has_adapters(part):
            _check_same_adapters(part.peft_config[ADAPTER_NAME], saved_config, folder, target)
        else:
            _inject(model, target, saved_config)
        state_dict = load_file(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
        result = set_peft_model_state_dict(part, state_dict, adapter_name=ADAPTER_NAME)
        # `load_state_dict(strict=False)` lists every base weight as missing, so only adapter keys count here.
        missing = [name for name in result.missing_keys if f".{ADAPTER_NAME}." in name and "lora_" in name]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"The LoRA weights in {folder!r} do not match the adapters of `model.{target}`: "
                f"{len(missing)} missing (e.g. {missing[:2]}), {len(result.unexpected_keys)} unexpected "
                f"(e.g. {result.unexpected_keys[:2]}). Load them into a model built from the same config."
            )
    return model


def merge_lora(model: SparForConditionalGeneration, target: str | None = None) -> SparForConditionalGeneration:
    """Fold the adapters into the base weights, remove the LoRA layers and return `model`.

    Afterwards the part has its original module structure and parameter names, so
    `save_pretrained` / `from_pretrained` work as for a model that never had adapters. The merged
    weights keep `requires_grad=False`, as LoRA training left them.

    Merging the MLLM restores `config.train_mllm` to its value before `add_lora` and clears
    `config.mllm_pretrained_path`, because the merged weights no longer equal the ones at that path and
    `save_pretrained` must write them instead of leaving them out.

    Args:
        target (`str`, *optional*): `"mllm"` or `"transformer"`. By default every part with adapters.
    """
    if target is not None:
        _check_target(target)
    targets = lora_targets(model) if target is None else [target]
    for name in targets:
        part = getattr(model, name)
        if not _has_adapters(part):
            raise ValueError(f"`model.{name}` has no LoRA adapters to merge.")

        for module_name, module in list(part.named_modules()):
            if isinstance(module, BaseTunerLayer):
                # `safe_merge` checks the merged weights for NaNs before writing them.
                module.merge(safe_merge=True)
                parent_name, _, child_name = module_name.rpartition(".")
                setattr(part.get_submodule(parent_name), child_name, module.get_base_layer())

        # Drop the adapter registration so the part is a plain model again, e.g. for a new `add_lora`.
        if hasattr(part, "peft_config"):
            del part.peft_config
        if name == "mllm":
            model.config.mllm_pretrained_path = None
            model.config.train_mllm = getattr(model, "_train_mllm_before_lora", False)
            model.mllm.train(model.training and model.config.train_mllm)
        logger.info("Merged the LoRA adapters of `%s` into its weights.", name)
    return model


def _check_target(target: str) -> None:
    if target not in LORA_TARGETS:
        raise ValueError(f"`target` must be one of {list(LORA_TARGETS)}. Got {target!r}.")


def _has_adapters(part: nn.Module) -> bool:
    return any(isinstance(module, BaseTunerLayer) for module in part.modules())


def _check_same_adapters(existing: LoraConfig, saved: LoraConfig, folder: str, target: str) -> None:
    # The weights alone cannot show a different `lora_alpha`, which would silently rescale every update.
    fields = ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")
    different = {}
    for name in fields:
        if getattr(existing, name) != getattr(saved, name):
            different[name] = (getattr(existing, name), getattr(saved, name))
    if different:
        raise ValueError(
            f"The LoRA config in {folder!r} differs from the adapters of `model.{target}` in {sorted(different)} "
            f"(model, file): {different}. Load it into a model without adapters on `{target}`."
        )


def _inject(model: SparForConditionalGeneration, target: str, config: LoraConfig) -> None:
    part = getattr(model, target)
    if _has_adapters(part):
        raise ValueError(
            f"`model.{target}` already has LoRA adapters. Merge them with `merge_lora` or build a new model first."
        )
    # peft freezes every other parameter of `part` and stores `config` as `part.peft_config[ADAPTER_NAME]`.
    inject_adapter_in_model(config, part, adapter_name=ADAPTER_NAME)
    if target == "mllm":
        model._train_mllm_before_lora = model.config.train_mllm
        model.config.train_mllm = True
        model.mllm.train(model.training)

    num_trainable = sum(p.numel() for p in part.parameters() if p.requires_grad)
    logger.info("Added LoRA (r=%d) to `%s`: %d trainable parameters.", config.r, target, num_trainable)


def _text_model_prefix(mllm: nn.Module) -> str:
    """Return the module name of the MLLM's text model within `mllm` (`""` when `mllm` is the text model)."""
    get_decoder = getattr(mllm, "get_decoder", None)
    text_model = get_decoder() if get_decoder is not None else None
    for name, module in mllm.named_modules():
        if module is text_model:
            return name
    return ""
