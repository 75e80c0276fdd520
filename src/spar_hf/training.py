"""Training on the stock `transformers.Trainer`: datasets, collators and a loss-logging trainer.

Every stage (vision stand-in, DC-AE teacher, SPAR tokenizer, SPAR generator) trains through
[`SparTrainer`], which logs each named loss term of the model output next to `loss`.
"""

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.utils import logging

from .tokenizer import SparTokenizerModel

logger = logging.get_logger(__name__)

LOGGED_TERMS = ("loss_rec", "loss_pixel", "loss_sem", "loss_flow", "loss_align", "routing_entropy")


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
