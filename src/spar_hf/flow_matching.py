"""The one flow-matching convention of spar_hf, shared by training and sampling.

Path (rectified flow, as SD3 and SANA in diffusers): `x_t = (1 - sigma) * x_0 + sigma * noise`,
with `x_0` the clean scaled latent and `sigma` in [0, 1] (`t` in the paper).
Target: the velocity `noise - x_0`, which `FlowMatchEulerDiscreteScheduler.step` integrates.
Timestep fed to the DiT: `sigma * 1000`, the scale of the scheduler's `timesteps`.
Training density: logit-normal `sigma = sigmoid(N(0, 1))`, then the scheduler's shift
`shift * sigma / (1 + (shift - 1) * sigma)`, so that training and sampling see the same sigmas.
"""

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply the resolution shift used by `FlowMatchEulerDiscreteScheduler(shift=...)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch_size: int, shift: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Draw training sigmas of shape `(batch_size,)` from the shifted logit-normal density."""
    normal = torch.randn(batch_size, generator=generator, device=generator.device if generator else None)
    return shift_sigmas(torch.sigmoid(normal), shift).to(device)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Interpolate clean `latents` `(B, C, H, W)` towards `noise` at per-sample `sigmas` `(B,)`."""
    sigmas = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Return the regression target `noise - latents`."""
    return noise - latents


def sigmas_to_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """Map sigmas in [0, 1] to DiT timesteps in [0, 1000]."""
    return sigmas * NUM_TRAIN_TIMESTEPS
