"""Fixtures for the model tests: the real GPT-2 tokenizer files and tiny random models."""

import ctypes
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from model import cpu_kernels
from model.batching import Batcher, Request
from model.config import GPTConfig
from model.generate import SamplingParams
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

BatchedTokens = Callable[[GPT, list[list[int]], SamplingParams], list[list[int]]]

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


def served(model: GPT, prompts: list[list[int]], params: SamplingParams, *, max_batch: int = 3,
           kv_dtype: torch.dtype | None = None, batcher: Batcher | None = None,
           cache_key: str | None = None) -> list[list[int]]:
    """Each prompt's tokens from a Batcher of the model (or batcher), as the engine's worker runs it:
    max_batch 1 serves them one at a time, alone; more rows run them as one busy batch (the later
    ones wait, then join)."""
    batcher = batcher or Batcher(model, max_batch=max_batch, cache_bytes=0, prefill_chunk=16, kv_dtype=kv_dtype)
    requests = [Request(prompt_ids=p, params=params, cache_key=cache_key) for p in prompts]
    for request in requests:
        batcher.add(request)
    tokens: dict[int, list[int]] = {id(r): [] for r in requests}
    with torch.inference_mode():
        while not batcher.idle:
            for request, item in batcher.step():
                if isinstance(item, int):
                    tokens[id(request)].append(item)
    return [tokens[id(r)] for r in requests]


@pytest.fixture
def batched_tokens() -> BatchedTokens:
    """Runs prompts as one busy batch of 3 rows through a Batcher of the model (served)."""
    return served


def sharp(model: GPT, seed: int) -> GPT:
    """Queries and keys large enough that attention picks positions (at GPT-2's initial scale
    it is near uniform, and a key in the wrong place would change no token); biases and layer
    norms not at their initial zeros and ones, so each is seen."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p.normal_(std=0.15)
            elif name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


# builds beside the native one: their flags and what they test
BUILDS = {
    "avx2": (("-mno-avx512f",), "the AVX2 tiles (vpmaddubsw for the integer products)"),
    "avx512-no-vnni": (("-mno-avx512vnni",), "AVX-512 integer products without VNNI (vpmaddubsw)"),
    "generic": (("-mno-avx512f", "-mno-avx2", "-mno-f16c"), "the plain C loops any CPU runs"),
}


@pytest.fixture(scope="module", params=["native", *BUILDS])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctypes.CDLL]:
    """cpu_kernels.c as built for this CPU, and as built without some of its instructions (see BUILDS),
    whatever this CPU has."""
    if request.param == "native":
        yield cpu_kernels.library()
        return
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the builds without AVX-512 or AVX2 are for x86-64")
    patch = pytest.MonkeyPatch()
    patch.setattr(cpu_kernels, "FLAGS", (*cpu_kernels.FLAGS, *BUILDS[request.param][0]))
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp(request.param)))
    cpu_kernels.library.cache_clear()
    try:
        yield cpu_kernels.library()
    finally:
        cpu_kernels.library.cache_clear()
        patch.undo()
