import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from spar_hf import flow_matching


def test_path_endpoints_and_midpoint():
    latents, noise = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), -1.0)
    values = [flow_matching.noisy_latents(latents, noise, torch.tensor([s])).item() for s in (0.0, 0.5, 1.0)]
    assert values == [2.0, 0.5, -1.0]


def test_velocity_target_is_noise_minus_latents():
    assert flow_matching.velocity_target(torch.tensor([2.0]), torch.tensor([-1.0])).item() == -3.0


def test_shift_matches_analytic_value():
    # shift * s / (1 + (shift - 1) * s) at shift 3, s 0.5: 1.5 / 2 = 0.75
    assert flow_matching.shift_sigmas(torch.tensor(0.5), 3.0).item() == 0.75


def test_timesteps_match_scheduler_scale():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas[:-1]
    assert torch.allclose(flow_matching.sigmas_to_timesteps(sigmas), scheduler.timesteps)


def test_euler_step_with_exact_velocity_reaches_clean_latents():
    # On the straight path the velocity is constant, so one Euler step from sigma=1 to 0 is exact.
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(1)
    latents, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x_t = flow_matching.noisy_latents(latents, noise, torch.ones(2))
    out = scheduler.step(flow_matching.velocity_target(latents, noise), scheduler.timesteps[0], x_t).prev_sample
    assert torch.allclose(out, latents, atol=1e-5)


def test_sampled_sigmas_lie_in_unit_interval():
    sigmas = flow_matching.sample_sigmas(1000, 3.0, generator=torch.Generator().manual_seed(0))
    assert sigmas.min() > 0
    assert sigmas.max() < 1
    # The shift pushes mass to high noise: the median of sigmoid(N(0,1)) is 0.5, shifted to 0.75.
    assert abs(sigmas.median().item() - 0.75) < 0.03
