"""spar_hf: SPAR (Semantic-Pixel Self-Alignment and Adaptive Routing) for transformers and diffusers."""

from transformers import AutoConfig, AutoModel

from .generator import SparConfig, SparForConditionalGeneration, SparOutput
from .routing import DynamicTokenRouter
from .tokenizer import SparTokenizerConfig, SparTokenizerModel

AutoConfig.register("spar_tokenizer", SparTokenizerConfig)
AutoConfig.register("spar", SparConfig)
AutoModel.register(SparTokenizerConfig, SparTokenizerModel)
AutoModel.register(SparConfig, SparForConditionalGeneration)

__version__ = "0.1.0"

__all__ = [
    "DynamicTokenRouter",
    "SparConfig",
    "SparForConditionalGeneration",
    "SparOutput",
    "SparTokenizerConfig",
    "SparTokenizerModel",
]

from .pipeline import SparPipeline  # noqa: E402  (after the Auto registrations, which it does not need)

__all__.append("SparPipeline")
