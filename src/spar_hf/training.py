"""Training on the stock `transformers.Trainer`: datasets, collators and a loss-logging trainer.

Every stage (vision stand-in, DC-AE teacher, SPAR tokenizer, SPAR generator) trains through
[`SparTrainer`], which logs each named loss term of the model output next to `loss`.
"""

import json
import math
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.utils import logging

from .checkpoints import check_finite
from .tokenizer import SparTokenizerModel

logger = logging.get_logger(__name__)

LOGGED_TERMS = (
    "loss_rec", "loss_pixel", "loss_sem", "loss_gan", "loss_disc", "loss_flow", "loss_align", "routing_entropy", "routing_gate",
)


class SparTrainer(Trainer):
    """`Trainer` that averages the named loss terms of each output between logging steps and logs them.

    A model output is read as a mapping; every key in `LOGGED_TERMS` it has is logged by that name.
    Models whose output has no `loss` (diffusers autoencoders, fed a `sample` column) are trained on
    `reconstruction_loss`.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts: dict[str, int] = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if isinstance(outputs, dict) and outputs.get("loss") is not None:
            loss = outputs["loss"]
        else:
            loss = reconstruction_loss(outputs, inputs["sample"])
        if model.training:
            for name in LOGGED_TERMS:
                value = outputs.get(name) if isinstance(outputs, dict) else None
                if value is not None:
                    self._term_sums[name] += float(value.detach())
                    self._term_counts[name] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            for name, total in self._term_sums.items():
                logs[name] = round(total / max(self._term_counts[name], 1), 5)
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, *args, **kwargs)


def reconstruction_loss(outputs, pixel_values: torch.Tensor) -> torch.Tensor:
    """MSE + L1 between a diffusers autoencoder's `sample` and its input, for the DC-AE teacher stand-in."""
    sample = outputs["sample"] if isinstance(outputs, dict) else outputs[0]
    return F.mse_loss(sample, pixel_values) + F.l1_loss(sample, pixel_values)


class DictDataset(Dataset):
    """Rows of equal-length tensors, served as dicts: `DictDataset(pixel_values=x, latents=y)[i]`."""

    def __init__(self, **columns) -> None:
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"All columns must have the same length. Got {lengths}.")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict:
        return {name: column[index] for name, column in self.columns.items()}


class PromptCollator:
    """Tokenise `caption` strings with the MLLM's tokenizer and stack every other column."""

    def __init__(self, tokenizer, max_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.tokenizer(
            [row["caption"] for row in rows], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        result = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        for name in rows[0]:
            if name != "caption":
                result[name] = torch.stack([torch.as_tensor(row[name]) for row in rows])
        return result


@torch.no_grad()
def extract_generator_targets(
    tokenizer_model: SparTokenizerModel, pixel_values: torch.Tensor, grid_size: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-extract scaled latents and self-alignment targets with the frozen SPAR tokenizer.

    Returns `latents` of shape `(N, C, h, w)`, already `(z - shift_factor) * scaling_factor`, and
    semantic features of shape `(N, grid_size**2, D)`.
    """
    tokenizer_model.eval()
    config = tokenizer_model.config
    latents, features = [], []
    for start in range(0, len(pixel_values), batch_size):
        chunk = pixel_values[start : start + batch_size]
        z = tokenizer_model.encode(chunk).latents  # (b, C, h, w)
        latents.append((z - config.shift_factor) * config.scaling_factor)
        features.append(tokenizer_model.get_semantic_features(chunk, grid_size))  # (b, g*g, D)
    return torch.cat(latents), torch.cat(features)


@torch.no_grad()
def latent_statistics(tokenizer_model: SparTokenizerModel, pixel_values: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """Return `(scaling_factor, shift_factor)` that give the latents of `pixel_values` zero mean and unit variance."""
    tokenizer_model.eval()
    latents = torch.cat([tokenizer_model.encode(pixel_values[i : i + batch_size]).latents for i in range(0, len(pixel_values), batch_size)])
    return 1.0 / float(latents.std()), float(latents.mean())


@torch.no_grad()
def prepare_tokenizer_for_inference(tokenizer_model: SparTokenizerModel, pixel_values: torch.Tensor) -> tuple[float, float]:
    """Turn a trained tokenizer into the frozen latent codec and alignment teacher of the generator.

    Drops the stage 2 anchor (only `L_s` reads it, and without it the alignment targets come from the
    trained encoder), freezes the encoder, and sets `scaling_factor`/`shift_factor` from the latents
    of `pixel_values` `(N, 3, H, W)`. Returns `(scaling_factor, shift_factor)`.
    """
    tokenizer_model.vision_anchor = None
    tokenizer_model.vision_encoder.requires_grad_(False)
    config = tokenizer_model.config
    config.train_vision_encoder, config.semantic_loss_weight = False, 0.0
    scale, shift = latent_statistics(tokenizer_model, pixel_values)
    check_finite("The latent statistics (scaling_factor, shift_factor)", scale, shift)
    config.scaling_factor, config.shift_factor = scale, shift
    return scale, shift


class VisionTextContrastiveModel(nn.Module):
    """A vision encoder trained with a symmetric InfoNCE loss against fixed text embeddings.

    Stands in for a pretrained vision tower (SigLIP, InternViT) when none can be downloaded: the
    text side is a frozen sentence encoder whose embeddings are computed once.
    """

    def __init__(self, vision_encoder: nn.Module, text_dim: int) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.projection = nn.Linear(vision_encoder.config.hidden_size, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, pixel_values: torch.Tensor, text_embeds: torch.Tensor) -> dict:
        tokens = self.vision_encoder(pixel_values=pixel_values).last_hidden_state  # (B, N, Dv)
        image_embeds = F.normalize(self.projection(tokens.mean(dim=1)), dim=-1)  # (B, Dt)
        text_embeds = F.normalize(text_embeds, dim=-1)  # (B, Dt)
        logits = self.logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B)
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"loss": loss, "logits": logits}


# ----------------------------------------------------------------------------- user data


def load_image_text_dataset(path: str, split: str = "train", image_column: str = "image", caption_column: str = "text"):
    """Load images with captions with `datasets`: an `imagefolder` (images + `metadata.jsonl`) or parquet file(s).

    Returns a `datasets.Dataset` with at least `image_column` and `caption_column`.
    """
    from datasets import load_dataset

    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DataFilesNotFoundError, DatasetGenerationError

    expected = "expected a folder of images with metadata.jsonl (imagefolder) or a .parquet file"
    if not os.path.exists(path):
        raise ValueError(f"{path!r} not found; {expected}.")
    try:
        if os.path.isdir(path):
            dataset = load_dataset("imagefolder", data_dir=path, split=split)
        elif path.endswith(".parquet"):
            dataset = load_dataset("parquet", data_files=path, split=split)
        else:
            raise ValueError(f"{path!r} is neither a folder nor a .parquet file; {expected}.")
    except (DataFilesNotFoundError, DatasetGenerationError, EmptyDatasetError) as error:
        raise ValueError(f"No images could be read from {path!r} ({error}); {expected}.") from error
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"No images found in {path!r}; {expected}.") from error
    missing = [c for c in dict.fromkeys((image_column, caption_column)) if c not in dataset.column_names]
    if missing:
        raise ValueError(f"Dataset at {path!r} has no column(s) {missing}; its columns are {dataset.column_names}.")
    return dataset


class ImageCaptionTransform:
    """`datasets` transform: centre-crop and resize images to `resolution`, scale to [-1, 1], keep captions.

    Writes `output_column` (`pixel_values` for the tokenizer, `target_pixel_values` for the generator)
    and `caption`.
    """

    def __init__(self, resolution: int, image_column: str = "image", caption_column: str = "text",
                 output_column: str = "pixel_values") -> None:
        self.resolution = resolution
        self.image_column = image_column
        self.caption_column = caption_column
        self.output_column = output_column

    def _pixels(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, H, W)

    def __call__(self, batch: dict) -> dict:
        result = {self.output_column: [self._pixels(image) for image in batch[self.image_column]]}
        if self.caption_column in batch:
            result["caption"] = list(batch[self.caption_column])
        return result


# ----------------------------------------------------------------------------- script arguments


def check_path_argument(flag: str, value: str | None) -> None:
    """Raise `ValueError` when `value` of command-line `flag` is a local path that does not exist.

    A Hub repo id (`namespace/name`, or a bare name) and a `python-package:` path are left to the loader.
    """
    if not value or value.startswith("python-package:") or os.path.exists(value):
        return
    if value.startswith((os.sep, ".", "~")) or value.count("/") > 1:
        raise ValueError(f"{flag} {value!r} not found.")


def parse_and_set_up(script_arguments, setup):
    """Parse `script_arguments` and `TrainingArguments` from the command line, seed, then call `setup(args, training_args)`.

    Returns `(args, training_args, setup's result)`. A `ValueError` or `OSError` from `setup` is
    printed as one argparse usage line, and the script exits with status 2.
    """
    parser = HfArgumentParser((script_arguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)  # seeds the initialisation of a model built from scratch, before the Trainer exists
    training_args.remove_unused_columns = False
    try:
        return args, training_args, setup(args, training_args)
    except (ValueError, OSError) as error:
        parser.error(str(error))


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """Raise `ValueError` when `output_dir` contains an earlier run's results or checkpoints and this run neither resumes nor overwrites."""
    if resume_from_checkpoint or overwrite or not os.path.isdir(output_dir):
        return
    results = ("final", "pipeline", "lora", "discriminator")
    earlier = sorted(name for name in os.listdir(output_dir) if name in results or name.startswith("checkpoint-"))
    if earlier:
        raise ValueError(
            f"--output_dir {output_dir!r} already contains {earlier}; pass --resume_from_checkpoint to continue that run "
            "or --overwrite to replace it."
        )


def check_generator_inputs(model, tokenizer_model: SparTokenizerModel, text_tokenizer) -> None:
    """Raise `ValueError` when the tokenizer's latents or the text tokenizer's ids do not fit the generator."""
    latent_channels = tokenizer_model.config.latent_channels
    in_channels = model.config.transformer_config["in_channels"]
    if latent_channels != in_channels:
        raise ValueError(
            f"--tokenizer makes {latent_channels}-channel latents, but the generator's DiT takes {in_channels} channels; "
            "use the tokenizer the generator was built for."
        )
    vocabulary, embedded = len(text_tokenizer), model.get_input_embeddings().num_embeddings
    if vocabulary > embedded:
        raise ValueError(
            f"--processor has {vocabulary} tokens, but the generator's MLLM embeds only {embedded}; use the processor "
            "of that MLLM (the tiny preset is for tests: pair --preset demo with src/spar_hf/demo_model/processor)."
        )


# ----------------------------------------------------------------------------- generator stages


GENERATOR_STAGES = (1, 2)


def configure_generator_stage(model, stage: int) -> None:
    """Freeze what a generator stage does not train.

    Stage 1 trains the queries, DTR, connector and null condition with the DiT frozen (it starts
    from SANA weights). Stage 2 also trains the DiT and the alignment projector. The MLLM follows
    `config.train_mllm` (LoRA adapters, if any, keep their own flags).
    """
    if stage not in GENERATOR_STAGES:
        raise ValueError(f"`stage` must be one of {GENERATOR_STAGES}. Got {stage!r}.")
    model.transformer.requires_grad_(stage == 2)
    model.alignment_enabled = stage == 2 and model.align_projector is not None
    if model.align_projector is not None:
        model.align_projector.requires_grad_(stage == 2)
    for module in (model.router, model.connector):
        module.requires_grad_(True)
    model.queries.requires_grad_(True)
    model.null_condition.requires_grad_(True)


class SparGeneratorTrainer(SparTrainer):
    """`SparTrainer` for the generator that encodes `target_pixel_values` with a frozen SPAR tokenizer on the fly.

    Batches that already carry pre-extracted `latents` (and `semantic_features`) skip the tokenizer.
    The tokenizer is the self-alignment teacher and is never trained here.
    """

    def __init__(self, *args, tokenizer_model: SparTokenizerModel | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer_model = tokenizer_model
        if tokenizer_model is not None:
            tokenizer_model.requires_grad_(False).eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "target_pixel_values" in inputs:
            if self.tokenizer_model is None:
                raise ValueError("Batches with `target_pixel_values` need `tokenizer_model` to encode them.")
            pixels = inputs.pop("target_pixel_values")
            unwrapped = model if hasattr(model, "alignment_enabled") else model.module  # DDP wraps in `.module`
            patch_size = unwrapped.config.transformer_config["patch_size"]
            grid = pixels.shape[-1] // self.tokenizer_model.config.downsample_ratio // patch_size
            if self.tokenizer_model.device != pixels.device:
                self.tokenizer_model.to(pixels.device)
            latents, features = extract_generator_targets(self.tokenizer_model, pixels, grid, batch_size=len(pixels))
            inputs["latents"] = latents
            if unwrapped.alignment_enabled:
                inputs["semantic_features"] = features
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


# ----------------------------------------------------------------------------- targets on disk

TARGETS_INFO = "spar_generator_targets.json"


def save_generator_targets(
    tokenizer_model: SparTokenizerModel, dataset, output_dir: str, grid_size: int, batch_size: int = 64,
    overwrite: bool = False,
) -> dict:
    """Encode a generator dataset once with the frozen tokenizer and store the targets with `datasets`.

    `dataset` yields `target_pixel_values` and `caption` (an `ImageCaptionTransform` output). The
    folder written by `Dataset.save_to_disk` has the columns `caption`, `latents` `(C, h, w)` and
    `semantic_features` `(grid_size**2, D)`, plus `spar_generator_targets.json` with the tokenizer
    settings the latents depend on. The dataset is written beside `output_dir` and renamed into
    place, so an interrupted run leaves any earlier folder as it was.
    """
    import shutil
    import tempfile

    from datasets import Array2D, Array3D, Dataset as HFDataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    if os.path.exists(output_dir) and not overwrite:
        raise ValueError(f"`output_dir` {output_dir!r} already exists; pass overwrite=True (--overwrite) to replace it.")
    device = next(tokenizer_model.parameters()).device
    config = tokenizer_model.config
    side = config.image_size // config.downsample_ratio
    tokenizer_model.eval()
    with torch.no_grad():
        probe = torch.zeros(1, 3, config.image_size, config.image_size, device=device)
        feature_dim = tokenizer_model.get_semantic_features(probe, grid_size).shape[-1]
    features = Features({
        "caption": Value("string"),
        "latents": Array3D(shape=(config.latent_channels, side, side), dtype="float32"),
        "semantic_features": Array2D(shape=(grid_size * grid_size, feature_dim), dtype="float32"),
    })

    def rows():
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            pixels = torch.stack(list(batch["target_pixel_values"])).to(device)  # (b, 3, H, W)
            latents, semantic = extract_generator_targets(tokenizer_model, pixels, grid_size, batch_size=len(pixels))
            if not (latents.isfinite().all() and semantic.isfinite().all()):
                raise ValueError(
                    f"The tokenizer gave NaN or infinite targets for rows {start} to {start + len(pixels) - 1}; "
                    "check that it is a trained SPAR tokenizer."
                )
            for caption, latent, feature in zip(batch["caption"], latents.cpu().numpy(), semantic.cpu().numpy()):
                yield {"caption": caption, "latents": latent, "semantic_features": feature}

    info = {
        "rows": len(dataset), "grid_size": grid_size, "latent_channels": config.latent_channels,
        "scaling_factor": config.scaling_factor, "shift_factor": config.shift_factor,
    }
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".spar_targets_", dir=parent)
    try:
        with tempfile.TemporaryDirectory(dir=parent) as cache:
            try:
                dataset_on_disk = HFDataset.from_generator(rows, features=features, cache_dir=cache)
            except DatasetGenerationError as error:
                # `datasets` wraps errors raised in `rows`; show ours (non-finite targets) as they are.
                if isinstance(error.__cause__, ValueError):
                    raise error.__cause__ from None
                raise
            dataset_on_disk.save_to_disk(os.path.join(staging, "data"))
        data = os.path.join(staging, "data")
        with open(os.path.join(data, TARGETS_INFO), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(output_dir):
            old = f"{staging}_old"
            os.replace(output_dir, old)
            os.replace(data, output_dir)
            shutil.rmtree(old)
        else:
            os.replace(data, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info


def is_generator_targets(path: str) -> bool:
    """Return whether `path` is a folder written by `save_generator_targets`."""
    return os.path.isfile(os.path.join(path, TARGETS_INFO))


def load_generator_targets(path: str, tokenizer_model: SparTokenizerModel | None = None, grid_size: int | None = None):
    """Load a folder written by `save_generator_targets` as a torch-formatted `datasets.Dataset`.

    With `tokenizer_model` and `grid_size`, check that the targets were made by a tokenizer with
    the same latent scaling and for the same DiT token grid.
    """
    from datasets import load_from_disk

    if not is_generator_targets(path):
        raise ValueError(f"`path` {path!r} has no {TARGETS_INFO}; write it with examples/extract_generator_targets.py.")
    with open(os.path.join(path, TARGETS_INFO)) as f:
        info = json.load(f)
    expected = {}
    if tokenizer_model is not None:
        config = tokenizer_model.config
        expected.update(latent_channels=config.latent_channels, scaling_factor=config.scaling_factor,
                        shift_factor=config.shift_factor)
    if grid_size is not None:
        expected["grid_size"] = grid_size
    for key, value in expected.items():
        if info[key] != value:
            raise ValueError(
                f"Targets in {path!r} were extracted with {key}={info[key]!r}, but this run needs {key}={value!r}; "
                "extract them again with the tokenizer and DiT patch size of this run."
            )
    return load_from_disk(path).with_format("torch", columns=["latents", "semantic_features"], output_all_columns=True)


# ----------------------------------------------------------------------------- EMA


class EMACallback(TrainerCallback):
    """Keep an exponential moving average of the trainable weights with diffusers' `EMAModel`.

    The average is saved as `ema.safetensors` and `ema_state.json` in every checkpoint folder and
    restored from `resume_from`, so a resumed run continues the same average. Call
    `copy_to_model()` before the final save to export the averaged weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, resume_from: str | None = None) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"`decay` must be in (0, 1). Got {decay}.")
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMAModel(self.parameters, decay=decay)
        if resume_from:
            self.load(resume_from)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.parameters)

    def on_save(self, args, state, control, **kwargs):
        self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        save_file({str(i): p.detach().contiguous() for i, p in enumerate(self.ema.shadow_params)}, os.path.join(folder, "ema.safetensors"))
        state = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        with open(os.path.join(folder, "ema_state.json"), "w") as f:
            json.dump(state, f)

    def load(self, folder: str) -> None:
        path = os.path.join(folder, "ema.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"`resume_from` {folder!r} has no ema.safetensors; resume from a checkpoint written with EMA on.")
        tensors = load_file(path)
        if len(tensors) != len(self.ema.shadow_params):
            raise ValueError(f"EMA in {folder!r} has {len(tensors)} tensors but the model trains {len(self.ema.shadow_params)}.")
        with open(os.path.join(folder, "ema_state.json")) as f:
            state = json.load(f)
        state["shadow_params"] = [tensors[str(i)] for i in range(len(tensors))]
        self.ema.load_state_dict(state)

    def copy_to_model(self) -> None:
        """Overwrite the trained weights with their average."""
        self.ema.copy_to(self.parameters)
