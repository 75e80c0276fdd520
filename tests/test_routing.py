import math

import pytest
import torch

from spar_hf.routing import DynamicTokenRouter, routing_entropy


def _layers(k=3, b=2, t=5, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, d, generator=generator) for _ in range(k)]


def test_dtr_starts_as_last_layer():
    router = DynamicTokenRouter(8, 3, "dtr")
    layers = _layers()
    routed, weights, _ = router(layers)
    assert torch.equal(routed, router.layer_norms[-1](layers[-1]))
    assert torch.equal(weights[..., -1], torch.ones(2, 5))


def test_dtr_weights_sum_to_one_after_training_step():
    router = DynamicTokenRouter(8, 3, "dtr")
    routed, _, _ = router(_layers())
    routed.pow(2).sum().backward()
    assert router.gate.grad is not None
    assert router.gate.grad.abs().item() > 0
    with torch.no_grad():
        router.gate.fill_(0.5)
        router.router.weight.normal_()
    _, weights, probabilities = router(_layers(seed=1))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 5))
    assert torch.allclose(weights, 0.5 * probabilities + 0.5 * torch.tensor([0.0, 0.0, 1.0]))
    # Different tokens now get different weights: the routing is per token.
    assert not torch.allclose(weights[0, 0], weights[0, 1])


def test_mean_mode_averages_normalised_layers():
    router = DynamicTokenRouter(8, 3, "mean")
    layers = _layers()
    routed, weights, _ = router(layers)
    expected = sum(norm(h) for norm, h in zip(router.layer_norms, layers)) / 3
    assert torch.allclose(routed, expected, atol=1e-6)
    assert torch.allclose(weights, torch.full((2, 5, 3), 1 / 3))


def test_last_mode_has_no_router():
    router = DynamicTokenRouter(8, 3, "last")
    assert not hasattr(router, "router")
    routed, _, _ = router(_layers())
    assert torch.equal(routed, router.layer_norms[-1](_layers()[-1]))


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        DynamicTokenRouter(8, 3, "max")


def test_wrong_layer_count_rejected():
    with pytest.raises(ValueError, match="Expected 3 hidden-state layers, got 2"):
        DynamicTokenRouter(8, 3)(_layers(k=2))


def test_entropy_of_uniform_and_one_hot():
    assert routing_entropy(torch.full((4, 3), 1 / 3)).item() == pytest.approx(math.log(3))
    assert routing_entropy(torch.tensor([[0.0, 0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-9)
