import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch

from spar_hf import SparPipeline


def _run(pipe, prompt="red apple", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _count_mllm_calls(pipe):
    counter = {"calls": 0}

    def hook(module, args, kwargs):
        counter["calls"] += 1
        counter["batch"] = kwargs["inputs_embeds"].shape[0]

    pipe.model.mllm.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def test_test_processor_knows_its_words(text_processor):
    # Prompts that differ must reach the model as different token ids, or prompt tests prove nothing.
    assert len(text_processor) == 45
    assert text_processor("red apple")["input_ids"] == [2, 5, 7, 3]
    assert text_processor("green apple")["input_ids"] == [2, 6, 7, 3]


def test_seeded_two_step_run(tiny_pipeline):
    images = _run(tiny_pipeline)
    assert images.shape == (1, 16, 16, 3)
    assert images.min() >= 0
    assert images.max() <= 1
    np.testing.assert_array_equal(images, _run(tiny_pipeline))
    assert not np.array_equal(images, _run(tiny_pipeline, seed=1))


def test_pil_output_and_tuple_return(tiny_pipeline):
    (images,) = tiny_pipeline("red apple", num_inference_steps=1, return_dict=False)
    assert isinstance(images[0], PIL.Image.Image)
    assert images[0].size == (16, 16)


def test_latent_and_pt_outputs(tiny_pipeline):
    latents = _run(tiny_pipeline, output_type="latent")
    assert latents.shape == (1, 4, 4, 4)
    assert _run(tiny_pipeline, output_type="pt").shape == (1, 3, 16, 16)


@pytest.mark.parametrize("steps", [1, 4])
def test_mllm_runs_once_per_call(tiny_pipeline, steps):
    counter = _count_mllm_calls(tiny_pipeline)
    _run(tiny_pipeline, prompt=["red apple", "sun behind cloud"], num_inference_steps=steps, num_images_per_prompt=2)
    assert counter["calls"] == 1
    assert counter["batch"] == 2  # the two prompts, not the four images


def test_negative_prompt_shares_the_single_mllm_call(tiny_pipeline):
    counter = _count_mllm_calls(tiny_pipeline)
    _run(tiny_pipeline, negative_prompt="green")
    assert counter["calls"] == 1
    assert counter["batch"] == 2
    assert not np.array_equal(_run(tiny_pipeline, negative_prompt="green"), _run(tiny_pipeline))


def test_generator_list_reproduces_single_runs(tiny_pipeline):
    batch = tiny_pipeline(
        "red apple", num_images_per_prompt=3, num_inference_steps=2, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in (0, 1, 2)],
    ).images
    for seed in (0, 1, 2):
        np.testing.assert_allclose(batch[seed], _run(tiny_pipeline, seed=seed)[0], atol=1e-5)


def test_prompts_in_a_batch_match_single_runs(tiny_pipeline):
    batch = tiny_pipeline(["red apple", "cat face with tears of joy"], num_inference_steps=2, output_type="np",
                          generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]).images
    np.testing.assert_allclose(batch[1], _run(tiny_pipeline, prompt="cat face with tears of joy")[0], atol=1e-5)


def test_guidance_changes_output_and_one_disables_it(tiny_pipeline):
    counter = _count_mllm_calls(tiny_pipeline)
    unguided = _run(tiny_pipeline, guidance_scale=1.0)
    assert counter["batch"] == 1
    assert not np.array_equal(unguided, _run(tiny_pipeline, guidance_scale=4.5))


def test_given_latents_are_used(tiny_pipeline):
    latents = torch.randn(1, 4, 4, 4)
    first = tiny_pipeline("red apple", latents=latents, num_inference_steps=2, output_type="np").images
    second = tiny_pipeline("red apple", latents=latents.clone(), num_inference_steps=2, output_type="np").images
    np.testing.assert_array_equal(first, second)


def test_callback_sees_every_step_and_can_edit_latents(tiny_pipeline):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(step)
        assert set(kwargs) == {"latents", "prompt_embeds"}
        return {"latents": torch.zeros_like(kwargs["latents"])}

    latents = tiny_pipeline("red apple", num_inference_steps=3, output_type="latent", callback_on_step_end=callback,
                            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert seen == [0, 1, 2]
    assert torch.count_nonzero(latents) == 0


def test_save_load_reproduces_image(tmp_path, tiny_pipeline):
    before = _run(tiny_pipeline)
    tiny_pipeline.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model", "model_index.json", "processor", "scheduler", "vae"]
    assert not list(tmp_path.rglob("*.bin"))
    np.testing.assert_array_equal(_run(SparPipeline.from_pretrained(tmp_path)), before)


def test_cpu_offload_runs(tiny_pipeline):
    pytest.importorskip("accelerate")
    before = _run(tiny_pipeline)
    tiny_pipeline.enable_model_cpu_offload(device="cpu")
    np.testing.assert_allclose(_run(tiny_pipeline), before, atol=1e-6)


def test_hub_repo_id_loads_offline_from_cache(tmp_path, tiny_pipeline):
    """Build a Hub cache by hand (as `snapshot_download` lays it out), then load by repo id with HF_HUB_OFFLINE=1."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--spar-tiny"
    tiny_pipeline.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    expected = _run(tiny_pipeline)
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from spar_hf import SparPipeline
        pipe = SparPipeline.from_pretrained("org/spar-tiny")
        images = pipe("red apple", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
        np.testing.assert_array_equal(images, np.load({str(tmp_path / 'expected.npy')!r}))
        print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_unknown_repo_offline_raises(tmp_path, monkeypatch):
    script = "from spar_hf import SparPipeline; SparPipeline.from_pretrained('org/not-cached')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "org/not-cached" in result.stderr or "offline" in result.stderr.lower()


def test_missing_model_index_rejected(tmp_path):
    with pytest.raises(ValueError, match="without model_index.json"):
        SparPipeline.from_pretrained(tmp_path)


def test_corrupt_weights_file_rejected(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ|invalid"):
        SparPipeline.from_pretrained(tmp_path)


def test_missing_weights_file_rejected(tmp_path, tiny_pipeline):
    tiny_pipeline.save_pretrained(tmp_path)
    os.remove(tmp_path / "vae" / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors|weights"):
        SparPipeline.from_pretrained(tmp_path)


def test_mismatched_latent_channels_rejected(tiny_generator, text_processor):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from spar_hf import SparTokenizerModel
    from spar_hf.presets import preset_configs

    vae = SparTokenizerModel(preset_configs("tiny", tokenizer_latent_channels=8)[0])
    with pytest.raises(ValueError, match="`latent_channels` \\(8\\) must equal the DiT's `in_channels` \\(4\\)"):
        SparPipeline(model=tiny_generator, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), processor=text_processor)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": ""}, ValueError, "`prompt` must not be empty"),
        ({"prompt": "   "}, ValueError, "`prompt` must not be empty"),
        ({"prompt": 3}, TypeError, "`prompt` must be a non-empty string"),
        ({"prompt": []}, TypeError, "`prompt` must be a non-empty string"),
        ({"prompt": ["a", None]}, TypeError, "`prompt` must be a non-empty string"),
        ({"height": 18}, ValueError, "`height` must be a positive multiple of 4"),
        ({"width": 0}, ValueError, "`width` must be a positive multiple of 4"),
        ({"num_inference_steps": 0}, ValueError, "`num_inference_steps` must be an integer >= 1"),
        ({"guidance_scale": -1.0}, ValueError, "`guidance_scale` must be a number >= 0"),
        ({"num_images_per_prompt": 0}, ValueError, "`num_images_per_prompt` must be an integer >= 1"),
        ({"output_type": "jpeg"}, ValueError, "`output_type` must be one of"),
        ({"negative_prompt": ["a", "b"]}, ValueError, "`negative_prompt` has 2 entries but `prompt` has 1"),
        ({"negative_prompt": 5}, TypeError, "`negative_prompt` must be a string or a list"),
        ({"image": "photo.png"}, TypeError, "`image` must be a PIL image"),
        ({"image": PIL.Image.new("RGB", (16, 16))}, ValueError, "needs an MLLM with a vision tower"),
        ({"generator": [torch.Generator()] * 2}, ValueError, "`generator` is a list of 2 generators but the batch has 1"),
        ({"latents": torch.zeros(1, 4, 5, 5)}, ValueError, "`latents` must have shape \\(1, 4, 4, 4\\)"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "`callback_on_step_end_tensor_inputs` has"),
    ],
)
def test_bad_inputs_rejected(tiny_pipeline, kwargs, error, message):
    kwargs = {"prompt": "red apple", "num_inference_steps": 1, **kwargs}
    with pytest.raises(error, match=message):
        tiny_pipeline(**kwargs)
