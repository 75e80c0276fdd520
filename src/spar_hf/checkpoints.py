"""Checks shared by the `from_pretrained` of the SPAR model classes."""

import math

# `from_pretrained` keyword arguments that also locate the config file.
_LOCATION_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def check_model_type(model_class, pretrained_model_name_or_path, **kwargs) -> None:
    """Raise `ValueError` when the checkpoint's `config.json` names another model type than `model_class` loads.

    transformers only logs a warning in that case and then loads the matching weights it finds (often
    none), which gives a random or broken model without an error.
    """
    if kwargs.get("config") is not None:
        return
    location = {key: kwargs[key] for key in _LOCATION_KWARGS if key in kwargs}
    config_dict, _ = model_class.config_class.get_config_dict(pretrained_model_name_or_path, **location)
    found, expected = config_dict.get("model_type"), model_class.config_class.model_type
    if found != expected:
        raise ValueError(
            f"{str(pretrained_model_name_or_path)!r} contains a {found!r} checkpoint, but {model_class.__name__} loads "
            f"{expected!r} checkpoints; pass the folder of a {model_class.__name__}."
        )


def check_finite(name: str, *values: float) -> None:
    """Raise `ValueError` naming `name` when any of `values` is NaN or infinite."""
    if not all(math.isfinite(value) for value in values):
        raise ValueError(f"{name} are not finite ({values}); the model produced NaN or infinite latents.")
