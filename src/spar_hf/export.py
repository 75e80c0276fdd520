"""Turn trained checkpoints into a pipeline folder that `SparPipeline.from_pretrained` loads."""

import os

from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import AutoProcessor, AutoTokenizer

from .generator import SparForConditionalGeneration, resolve_pretrained_path
from .pipeline import SparPipeline
from .tokenizer import SparTokenizerModel


def load_processor(path: str):
    """Load the MLLM's processor (text + images) where the folder has one, else its tokenizer."""
    folder = resolve_pretrained_path(path)
    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError):
        return AutoTokenizer.from_pretrained(folder)


def export_pipeline(generator_dir: str, tokenizer_dir: str, processor_path: str, output_dir: str, overwrite: bool = False) -> SparPipeline:
    """Assemble `model_index.json` + `model/`, `vae/`, `scheduler/`, `processor/` in `output_dir`.

    The scheduler's shift is the generator's `flow_shift`, so sampling uses the sigmas training saw.
    """
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ValueError(f"`output_dir` {output_dir!r} is not empty; pass overwrite=True (--overwrite) to replace it.")
    model = SparForConditionalGeneration.from_pretrained(generator_dir)
    vae = SparTokenizerModel.from_pretrained(tokenizer_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=model.config.flow_shift)
    pipe = SparPipeline(model=model, vae=vae, scheduler=scheduler, processor=load_processor(processor_path))
    pipe.save_pretrained(output_dir)
    return pipe
