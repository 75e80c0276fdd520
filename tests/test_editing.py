"""Instruction editing end to end: a real tiny `InternVLProcessor` feeding a SPAR model whose MLLM is a tiny InternVL."""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import InternVLProcessor, PreTrainedTokenizerFast

from spar_hf import SparForConditionalGeneration, SparPipeline, SparTokenizerModel
from spar_hf.presets import preset_configs

# transformers 5.25 builds every `InternVLProcessor` with a video processor, because `ProcessorMixin.__init__`
# type-checks each sub-processor and rejects `None`. InternVL's video processor needs torchvision.
# NOTE: the CI environment (torch 2.13.0 CPU) has no torchvision, so there these tests skip and have not run as written.
pytest.importorskip("torchvision", reason="transformers' InternVLProcessor needs a video processor, which needs torchvision")
from transformers import GotOcr2ImageProcessor  # noqa: E402  (the torchvision backend, AutoImageProcessor's choice for InternVL)
from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor  # noqa: E402

from test_generator import TINY_INTERNVL  # noqa: E402
from test_pipeline import _count_mllm_calls  # noqa: E402

SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
WORDS = ["make", "it", "green", "red", "blue", "the", "sky", "apple", "turn", "into", "cat", "ugly", "blurry"]
# The tiny InternVL splits a 16x16 image into 4x4 patches of 4 pixels. Pixel shuffle with `downsample_ratio` 0.5
# merges each 2x2 block into one token, so the LLM gets (16 / 4 * 0.5) ** 2 = 4 image tokens.
IMAGE_SIZE = 16
IMAGE_SEQ_LENGTH = 4


def _internvl_processor() -> InternVLProcessor:
    """Build a word-level tokenizer with InternVL's image tokens, a 16x16 image processor and the processor around them."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *SPECIAL_TOKENS.values(), *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", extra_special_tokens=dict(SPECIAL_TOKENS)
    )
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    # `InternVLProcessor` turns `crop_to_patches` on for every call (a class-level default that outranks the image
    # processor's own setting), so `max_patches=1` is what keeps each image to a single 16x16 tile.
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=False, max_patches=1)
    video_processor = InternVLVideoProcessor(size=size)
    return InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        image_seq_length=IMAGE_SEQ_LENGTH,
    )


@pytest.fixture(scope="module")
def processor():
    return _internvl_processor()


@pytest.fixture
def editing_pipeline(processor):
    mllm_config = copy.deepcopy(TINY_INTERNVL)
    mllm_config["image_token_id"] = processor.image_token_id
    tokenizer_config, generator_config = preset_configs("tiny", generator_mllm_config=mllm_config)
    torch.manual_seed(0)
    vae = SparTokenizerModel(tokenizer_config).eval()
    model = SparForConditionalGeneration(generator_config).eval()
    return SparPipeline(model=model, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), processor=processor)


def _photo(seed: int, width: int = 24, height: int = 20) -> PIL.Image.Image:
    """A random RGB image, deliberately not 16x16, so the processor must resize it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def _edit(pipe, image, prompt="make it green", seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return pipe(prompt, image=image, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_processor_matches_tiny_internvl(processor, editing_pipeline):
    mllm_config = editing_pipeline.model.config.mllm_config
    assert processor.image_token == "<IMG_CONTEXT>"
    assert processor.image_token_id == mllm_config.image_token_id
    assert len(processor.tokenizer) <= mllm_config.text_config.vocab_size

    batch = processor(text=[f"{processor.image_token}\nmake it green"], images=[_photo(0)], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (batch["input_ids"] == processor.image_token_id).sum().item() == IMAGE_SEQ_LENGTH


def test_edit_returns_image_of_requested_size(editing_pipeline):
    (image,) = editing_pipeline("make it green", image=_photo(0), num_inference_steps=1).images
    assert isinstance(image, PIL.Image.Image)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)

    edited = _edit(editing_pipeline, _photo(0), height=24, width=32)
    assert edited.shape == (1, 24, 32, 3)
    assert edited.min() >= 0
    assert edited.max() <= 1


def test_input_image_changes_edit(editing_pipeline):
    first = _edit(editing_pipeline, _photo(0))
    np.testing.assert_array_equal(first, _edit(editing_pipeline, _photo(0)))
    assert not np.allclose(first, _edit(editing_pipeline, _photo(1)), atol=1e-4)


def test_batch_with_one_image_per_prompt(editing_pipeline):
    prompts = ["make it green", "turn the sky into blue"]
    images = [_photo(0), _photo(1)]
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    batch = editing_pipeline(prompts, image=images, num_inference_steps=2, output_type="np", generator=generators).images
    assert batch.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    # Prompts of different lengths are padded together, but each edit must still match its own single run.
    for prompt, image, edited in zip(prompts, images, batch):
        np.testing.assert_allclose(edited, _edit(editing_pipeline, image, prompt=prompt)[0], atol=1e-5)


def test_negative_prompt_shares_single_mllm_call(editing_pipeline):
    counter = _count_mllm_calls(editing_pipeline)
    guided = _edit(editing_pipeline, _photo(0), negative_prompt="blurry", guidance_scale=4.5)
    assert counter["calls"] == 1
    assert counter["batch"] == 2  # the instruction and the negative prompt, each with the image
    assert not np.array_equal(guided, _edit(editing_pipeline, _photo(0), guidance_scale=4.5))


def test_save_load_reproduces_edit(tmp_path, editing_pipeline):
    before = _edit(editing_pipeline, _photo(0))
    editing_pipeline.save_pretrained(tmp_path)
    loaded = SparPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.processor, InternVLProcessor)
    assert loaded.processor.image_seq_length == IMAGE_SEQ_LENGTH
    assert loaded.processor.image_token_id == editing_pipeline.model.config.mllm_config.image_token_id
    np.testing.assert_array_equal(_edit(loaded, _photo(0)), before)
