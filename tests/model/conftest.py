"""Fixtures for the model tests: the real GPT-2 tokenizer files and tiny random models."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

CHAT_CORPUS = [
    "Hello there! How are you doing today?",
    "I'm fine, thanks. What's the weather like in Zürich?",
    "It's 21°C and sunny — perfect for a walk 🌞.",
    "Numbers: 1, 22, 333, 4444; code: def f(x): return x * 2",
    "日本語のテキストも少し。中文也有一点。",
] * 20


@pytest.fixture(scope="session")
def gpt2_files() -> Path:
    """Folder with OpenAI's encoder.json + vocab.bpe (see the README next to them)."""
    folder = Path(os.environ.get("GPT2_TOKENIZER_DIR", "/work/shared/data/gpt2-tokenizer"))
    if not (folder / "encoder.json").is_file():
        pytest.skip(f"GPT-2 tokenizer files not found in {folder}")
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer(gpt2_files: Path) -> ChatTokenizer:
    return ChatTokenizer.from_gpt2_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")


@pytest.fixture(scope="session")
def chat_tokenizer() -> ChatTokenizer:
    return ChatTokenizer.train(CHAT_CORPUS, vocab_size=400)


@pytest.fixture
def make_model() -> Callable[..., GPT]:
    """Build a tiny seeded GPT in eval mode; keyword arguments override GPTConfig fields."""

    def make(seed: int = 0, **overrides: object) -> GPT:
        fields = dict(vocab_size=400, block_size=32, n_layer=2, n_head=2, n_embd=32)
        fields.update(overrides)
        torch.manual_seed(seed)
        return GPT(GPTConfig(**fields)).eval()

    return make
