"""The tokenizer's optional GAN term: who each loss trains, when it starts, and saving the discriminator."""

import pytest
import torch

from spar_hf.adversarial import (
    AdversarialStartCallback,
    PatchDiscriminator,
    SparTokenizerWithDiscriminator,
    hinge_discriminator_loss,
)


def _gradients(module):
    return {name: param.grad.clone() for name, param in module.named_parameters() if param.grad is not None}


def _moved(module):
    """Return the names of parameters with a nonzero gradient."""
    return [name for name, grad in _gradients(module).items() if grad.abs().sum() > 0]


@pytest.fixture
def gan_model(tiny_tokenizer_model):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    return SparTokenizerWithDiscriminator(tiny_tokenizer_model, discriminator, gan_loss_weight=0.5)


@pytest.mark.parametrize("num_layers, side", [(1, 8), (2, 4), (3, 2)])
def test_discriminator_logit_grid(num_layers, side):
    discriminator = PatchDiscriminator(base_channels=6, num_layers=num_layers)
    assert discriminator(torch.zeros(2, 3, 16, 16)).shape == (2, 1, side, side)


def test_hinge_loss_zero_when_separated():
    assert hinge_discriminator_loss(torch.full((4,), 1.5), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)


def test_inactive_model_returns_tokenizer_loss(gan_model):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    output = gan_model(pixel_values=pixels)
    expected = gan_model.tokenizer(pixel_values=pixels).loss
    torch.testing.assert_close(output.loss, expected, rtol=0, atol=0)
    assert output.loss_gan is None
    output.loss.backward()
    assert not _gradients(gan_model.discriminator)


def test_each_loss_trains_its_own_player(gan_model):
    gan_model.adversarial_active = True
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    output = gan_model(pixel_values=pixels)
    assert output.loss_gan is not None
    output.loss.backward()
    together = _gradients(gan_model.tokenizer), _gradients(gan_model.discriminator)

    # The same losses apart: the tokenizer's terms alone, then the discriminator's alone.
    gan_model.zero_grad()
    output = gan_model(pixel_values=pixels)
    (output.loss - output.loss_disc).backward(retain_graph=True)
    tokenizer_only = _gradients(gan_model.tokenizer)
    assert not _moved(gan_model.discriminator)
    gan_model.zero_grad()
    output.loss_disc.backward()
    assert not _moved(gan_model.tokenizer)
    discriminator_only = _gradients(gan_model.discriminator)

    assert together[0].keys() == tokenizer_only.keys()
    for name, grad in tokenizer_only.items():
        torch.testing.assert_close(together[0][name], grad)
    assert together[1].keys() == discriminator_only.keys()
    for name, grad in discriminator_only.items():
        torch.testing.assert_close(together[1][name], grad)
    # The GAN term does move the decoder.
    gan_model.zero_grad()
    gan_model(pixel_values=pixels).loss_gan.backward()
    assert _moved(gan_model.tokenizer.decoder)


@pytest.mark.parametrize("global_step, active", [(0, False), (2, False), (3, True), (7, True)])
def test_start_callback(gan_model, global_step, active):
    callback = AdversarialStartCallback(gan_model, start_step=3)
    callback.on_step_begin(None, type("State", (), {"global_step": global_step})(), None)
    assert gan_model.adversarial_active is active


def test_rejects_bad_settings(tiny_tokenizer_model):
    with pytest.raises(ValueError, match="`gan_loss_weight` must be > 0. Got 0.0"):
        SparTokenizerWithDiscriminator(tiny_tokenizer_model, PatchDiscriminator(), gan_loss_weight=0.0)
    with pytest.raises(ValueError, match="`num_layers` must be >= 1. Got 0"):
        PatchDiscriminator(num_layers=0)
    model = SparTokenizerWithDiscriminator(tiny_tokenizer_model, PatchDiscriminator(), gan_loss_weight=0.1)
    with pytest.raises(ValueError, match="`start_step` must be >= 0. Got -1"):
        AdversarialStartCallback(model, start_step=-1)


def test_discriminator_round_trip(tmp_path):
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2)
    discriminator.save_pretrained(tmp_path)
    loaded = PatchDiscriminator.from_pretrained(tmp_path)
    assert loaded.config.base_channels == 8
    pixels = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(pixels), discriminator(pixels), rtol=0, atol=0)
