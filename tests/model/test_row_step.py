"""A large model's one-row decoding steps: compiled per block, the same tokens as the model, no compile while serving."""

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

from model import row_step
from model.batching import Batcher, Request
from model.config import GPTConfig
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import prepare
from model.kv_pool import RowKVCache
from model.row_step import RowStepBlock

# 2 layers, a 48-token window: long replies slide it; prepared as a large model (row steps)
CONFIG = GPTConfig(vocab_size=700, block_size=48, n_layer=2, n_head=4, n_embd=128)
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=70)


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "no-bias"])
def model(request: pytest.FixtureRequest) -> GPT:
    return sharp(GPT(replace(CONFIG, bias=request.param)).eval(), seed=3)


def sharp(model: GPT, seed: int) -> GPT:
    """Queries and keys large enough that attention picks positions (at GPT-2's initial scale
    it is near uniform, and a key in the wrong place would change no token); biases and layer
    norms not at their initial zeros and ones, so each is seen."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_attn.weight"):
                p.normal_(std=0.15)
            elif name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p), alpha=0.1)
    return model


@pytest.fixture(scope="module")
def prepared(model: GPT) -> GPT:
    return prepare(model, "float32", row_kernel_min_bytes=0)


@pytest.fixture
def block_calls(prepared: GPT, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The positions each of prepared's compiled block steps ran with, the kernel itself still running."""
    calls: list[int] = []
    compiled = row_step.compiled_steps().block

    def counted(x: torch.Tensor, k: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        calls.append(k.size(1))
        return compiled(x, k, *rest)

    for block in prepared.transformer.h:
        assert block.step is compiled
        monkeypatch.setattr(block, "step", counted)
    return calls


def served(model: GPT, prompt: list[int], params: SamplingParams, cache_key: str | None = None,
           batcher: Batcher | None = None) -> list[int]:
    """The tokens a Batcher gives for prompt alone, as the engine's worker runs it."""
    batcher = batcher or Batcher(model, max_batch=4, cache_bytes=2**22, prefill_chunk=16)
    request = Request(prompt_ids=prompt, params=params, cache_key=cache_key)
    batcher.add(request)
    tokens: list[int] = []
    with torch.inference_mode():
        while not batcher.idle:
            tokens += [item for r, item in batcher.step() if r is request and isinstance(item, int)]
    return tokens


def test_every_block_is_a_row_step_block_over_the_models_own_weights(model: GPT, prepared: GPT) -> None:
    assert all(isinstance(block, RowStepBlock) for block in prepared.transformer.h)
    step = prepared.transformer.h[1]
    assert step._weights[2].data_ptr() == model.transformer.h[1].attn.c_attn.weight.data_ptr()  # not a copy


def test_a_lone_streams_steps_run_the_kernel_and_give_the_models_tokens(
    model: GPT, prepared: GPT, block_calls: list[int]
) -> None:
    prompt = [7, 8, 9, 10, 11]
    with torch.inference_mode():
        expected = list(generate_tokens(model, prompt, GREEDY))
    assert served(prepared, prompt, GREEDY) == expected  # 70 tokens: the 48-token window slides
    assert len(block_calls) >= CONFIG.n_layer * 50
    assert max(block_calls) == CONFIG.block_size  # up to the window's last position


def test_the_next_turn_of_a_conversation_runs_its_last_prompt_token_through_the_kernel(
    model: GPT, prepared: GPT, block_calls: list[int]
) -> None:
    """A turn whose prompt is the cached one plus a token prefills that token alone, as a decoding step."""
    params = replace(GREEDY, max_new_tokens=5)
    batcher = Batcher(prepared, max_batch=2, cache_bytes=2**22, prefill_chunk=16)
    first = [5, 6, 7]
    second = first + served(prepared, first, params, "c", batcher)  # cached: all but the reply's last token
    block_calls.clear()
    with torch.inference_mode():
        expected = list(generate_tokens(model, second, params))
    assert served(prepared, second, params, "c", batcher) == expected
    assert batcher.stats().reused_tokens == len(second) - 1
    assert block_calls[: CONFIG.n_layer] == [len(second)] * CONFIG.n_layer  # the prompt's last token


def test_batches_and_prefills_run_the_blocks_own_code(prepared: GPT, block_calls: list[int]) -> None:
    kv = RowKVCache(prepared.config, 3, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        prepared.forward_last(torch.tensor([[4, 5, 6]]), kv.row(0), 0)  # a prefill of three tokens
        prepared.forward_last(torch.tensor([[4, 5, 6]]), kv.row(1), 0)
        prepared.decode_rows(torch.tensor([7, 8]), torch.tensor([3, 3]), kv)  # two rows
    assert block_calls == []


def test_after_preparing_serving_compiles_nothing(model: GPT) -> None:
    """A compile at a first reply would cost seconds: prepare compiles for the model's shapes."""
    fresh = prepare(sharp(GPT(CONFIG).eval(), seed=4), "float32", row_kernel_min_bytes=0)
    torch._dynamo.utils.counters.clear()
    served(fresh, [4, 5, 6, 7], replace(GREEDY, max_new_tokens=60))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_without_a_compiler_the_layers_run_their_own_code(model: GPT, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    def fails(*args: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(row_step, "compiled_steps", lambda: row_step.RowSteps(fails, fails))
    with caplog.at_level("WARNING", logger="model.row_step"):
        plain = prepare(model, "float32", row_kernel_min_bytes=0)
    assert "could not be compiled (no C++ compiler)" in caplog.text
    assert not any(isinstance(block, RowStepBlock) for block in plain.transformer.h)
    assert plain.lm_head.one_row is F.linear
    with torch.inference_mode():
        assert served(plain, [5, 6], replace(GREEDY, max_new_tokens=8)) == list(
            generate_tokens(model, [5, 6], replace(GREEDY, max_new_tokens=8))
        )


def test_a_model_that_fits_the_cache_leaves_the_compiler_unimported() -> None:
    """Importing torch's compiler costs a process about 110 MiB: the shipped model's bot does without it."""
    code = (
        "import sys\n"
        "from model.config import GPTConfig\n"
        "from model.engine import InferenceEngine\n"
        "from model.gpt import GPT\n"
        "from model.inference_weights import prepare\n"
        "prepare(GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval(), 'float32')\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
