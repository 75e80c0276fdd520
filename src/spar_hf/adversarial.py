"""The optional GAN term of the tokenizer's reconstruction loss `L_r`.

A convolutional patch discriminator (the PatchGAN idea of Isola et al., "Image-to-Image Translation
with Conditional Adversarial Networks", 2017) scores overlapping patches of real and decoded images
with hinge losses. [`SparTokenizerWithDiscriminator`] trains both players in one backward pass, so
the stock `transformers.Trainer`, its single optimizer, its checkpoints and its resume all apply:

- the tokenizer's term `-D(decoded)` reaches the tokenizer only: it is computed with detached
  discriminator weights;
- the discriminator's hinge loss reaches the discriminator only: it is given the decoded image detached.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.func import functional_call
from transformers import TrainerCallback

from .tokenizer import SparTokenizerModel, SparTokenizerOutput


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """Convolutional discriminator that returns one real/fake logit per image patch, `(B, 1, h, w)`.

    `num_layers` stride-2 convolutions halve the resolution each, with GroupNorm and LeakyReLU
    between them; a last convolution maps to one channel. Each logit covers a square of about
    `2 ** (num_layers + 2)` pixels on a side (38 for 3 layers).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, max_channels: int = 512) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1. Got {num_layers}.")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = base_channels
        for _ in range(num_layers - 1):
            out_channels = min(channels * 2, max_channels)
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=2, padding=1),
                nn.GroupNorm(math.gcd(32, out_channels), out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layers(pixel_values)  # (B, 1, h, w)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Return the discriminator's hinge loss: real logits pushed above 1, fake logits below -1."""
    return (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()) / 2


class SparTokenizerWithDiscriminator(nn.Module):
    """A SPAR tokenizer and a patch discriminator trained together under one optimizer.

    `forward` returns the tokenizer's output with `loss = tokenizer loss + gan_loss_weight * loss_gan
    + loss_disc` while `adversarial_active` is set, and the tokenizer's output unchanged before.
    [`AdversarialStartCallback`] sets the flag from the optimizer step.
    """

    def __init__(self, tokenizer: SparTokenizerModel, discriminator: PatchDiscriminator, gan_loss_weight: float) -> None:
        super().__init__()
        if gan_loss_weight <= 0:
            raise ValueError(f"`gan_loss_weight` must be > 0. Got {gan_loss_weight}.")
        self.tokenizer = tokenizer
        self.discriminator = discriminator
        self.gan_loss_weight = gan_loss_weight
        self.adversarial_active = False
        # accelerate's FSDP auto-wrap reads the class names to shard from here.
        self._no_split_modules = list(getattr(tokenizer, "_no_split_modules", None) or [])

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> SparTokenizerOutput:
        output = self.tokenizer(pixel_values=pixel_values, return_dict=True)
        if not self.adversarial_active:
            return output
        frozen = {name: tensor.detach() for name, tensor in self.discriminator.state_dict(keep_vars=True).items()}
        loss_gan = -functional_call(self.discriminator, frozen, (output.sample,)).mean()
        real_and_fake = torch.cat([pixel_values, output.sample.detach()])
        real_logits, fake_logits = self.discriminator(real_and_fake).chunk(2)
        loss_disc = hinge_discriminator_loss(real_logits, fake_logits)
        output.loss = output.loss + self.gan_loss_weight * loss_gan + loss_disc
        output["loss_gan"], output["loss_disc"] = loss_gan, loss_disc
        return output


class AdversarialStartCallback(TrainerCallback):
    """Switch the GAN terms of a [`SparTokenizerWithDiscriminator`] on from optimizer step `start_step` (0-based)."""

    def __init__(self, model: SparTokenizerWithDiscriminator, start_step: int) -> None:
        if start_step < 0:
            raise ValueError(f"`start_step` must be >= 0. Got {start_step}.")
        self.model = model
        self.start_step = start_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.model.adversarial_active = state.global_step >= self.start_step
