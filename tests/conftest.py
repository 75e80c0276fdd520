import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import BertTokenizerFast

from spar_hf import SparForConditionalGeneration, SparPipeline, SparTokenizerModel
from spar_hf.presets import preset_configs

WORDS = ["red", "green", "apple", "sun", "behind", "cloud", "cat", "face", "with", "tears", "of", "joy", "make", "the"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; opt in with `-m slow`")
    torch.set_num_threads(int(os.environ.get("SPAR_TEST_THREADS", "1")))


@pytest.fixture
def tiny_configs():
    return preset_configs("tiny")


@pytest.fixture
def tiny_tokenizer_model(tiny_configs):
    torch.manual_seed(0)
    return SparTokenizerModel(tiny_configs[0]).eval()


@pytest.fixture
def tiny_generator(tiny_configs):
    torch.manual_seed(0)
    return SparForConditionalGeneration(tiny_configs[1]).eval()


@pytest.fixture(scope="session")
def text_processor():
    """A real BERT WordPiece tokenizer over a small vocabulary, within the tiny MLLM's 1,000 embeddings."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    # transformers 5 ignores `vocab_file` here (every word became [UNK]), so the vocabulary is passed as a mapping.
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)})


@pytest.fixture
def tiny_pipeline(tiny_generator, tiny_tokenizer_model, text_processor):
    return SparPipeline(
        model=tiny_generator, vae=tiny_tokenizer_model, scheduler=FlowMatchEulerDiscreteScheduler(), processor=text_processor
    )
