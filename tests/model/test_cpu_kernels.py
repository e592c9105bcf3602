"""Packed weights' products and a lone stream's decoding steps in C (model/cpu_kernels.c): the same
results and tokens as the model, for the GPT-2 family's options and the Llama family's, and a fallback."""

import ctypes
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model import cpu_kernels
from conftest import BatchedTokens, sharp
from model.batching import Batcher, Request
from model.config import GPTConfig
from model.cpu_kernels import PackedLinear, RowStepBlock
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT, KVCache
from model.inference_weights import prepare
from model.kv_pool import RowKVCache

# 2 layers, a 48-token window: long replies slide it
CONFIG = GPTConfig(vocab_size=700, block_size=48, n_layer=2, n_head=4, n_embd=128)
# Llama's options: rotary positions (Llama 3's scaling), RMSNorm, SwiGLU, 2 key/value heads for 4
# query heads, a separate LM head; Qwen2's: q/k/v biases alone, a tied head
LLAMA = dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, n_inner=200, bias=False,
             tie_embeddings=False, rope_scaling="llama3", rope_factor=8.0, rope_original_context=16)
CONFIGS = {
    "bias": CONFIG,
    "no-bias": replace(CONFIG, bias=False),
    "llama": GPTConfig(**{**CONFIG.to_dict(), **LLAMA, "qkv_bias": False, "n_inner": 200}),
    "qwen2": GPTConfig(**{**CONFIG.to_dict(), **LLAMA, "qkv_bias": True, "tie_embeddings": True,
                          "rope_scaling": "none", "rope_theta": 1e6, "norm_eps": 1e-6}),
}
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=70)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> GPT:
    return sharp(GPT(CONFIGS[request.param]).eval(), seed=3)


@pytest.fixture(scope="module")
def prepared(model: GPT) -> GPT:
    return prepare(model, "float32")


@pytest.fixture
def block_calls(prepared: GPT, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The positions each of prepared's C block steps ran at, a list per call (one a row), the
    kernel itself still running."""
    calls: list[list[int]] = []
    lib = prepared.transformer.h[0]._lib

    class Counted:
        def __getattr__(self, name: str) -> object:
            return getattr(lib, name)

        def block_rows(self, *args: object) -> int:
            rows, positions = args[2], ctypes.cast(args[3], ctypes.POINTER(ctypes.c_int64))
            calls.append([positions[i] for i in range(rows)])
            return lib.block_rows(*args)

    for block in prepared.transformer.h:
        monkeypatch.setattr(block, "_lib", Counted())
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


def test_every_block_is_a_row_step_block_over_packed_copies_of_the_models_weights(model: GPT, prepared: GPT) -> None:
    assert all(isinstance(block, RowStepBlock) for block in prepared.transformer.h)
    step = prepared.transformer.h[1]
    linear = model.transformer.h[1].attn.c_attn
    assert step._block.attn.f == step.block.attn.c_attn.packed.data_ptr() and step._block.attn.q is None
    assert torch.equal(step.block.attn.c_attn.packed, cpu_kernels.pack(linear.weight))
    assert step._block.ln1_w == model.transformer.h[1].ln_1.weight.data_ptr()  # layer norms shared
    assert isinstance(model.transformer.h[1].attn.c_attn, torch.nn.Linear)  # the original as it was


def test_pack_puts_sixteen_outputs_of_one_input_side_by_side() -> None:
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)  # 20 outputs: a panel and 4 of another
    packed = cpu_kernels.pack(weight)
    assert packed.shape == (2, 3, 16)
    assert torch.equal(packed[0, 1], weight[:16, 1]) and torch.equal(packed[1, 2, :4], weight[16:, 2])
    assert torch.equal(packed[1, :, 4:], torch.zeros(3, 12))  # padding


def test_a_block_step_gives_the_blocks_output_and_stores_its_key_and_value(model: GPT, prepared: GPT) -> None:
    config = model.config
    torch.manual_seed(5)
    # rotary models: the block's own code takes the angles of its positions; the kernel reads the table
    ropes = [None, None] if model.rotary is None else [model.rotary(torch.arange(6)), model.rotary(torch.tensor([6]))]
    for layer, (theirs, ours) in enumerate(zip(model.transformer.h, prepared.transformer.h)):
        caches = [KVCache(config, 1, torch.device("cpu"), torch.float32) for _ in range(2)]
        prefix, x = torch.randn(1, 6, config.n_embd), torch.randn(1, 1, config.n_embd)
        with torch.inference_mode():
            expected = [block(prefix, cache, 0, ropes[0]) for block, cache in zip((theirs, ours), caches)]  # own code
            torch.testing.assert_close(expected[1], expected[0])
            expected, got = theirs(x, caches[0], 6, ropes[1]), ours(x, caches[1], 6, ropes[1])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].k[layer], caches[0].k[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(caches[1].v[layer], caches[0].v[layer], rtol=1e-5, atol=1e-5)


def test_a_lone_streams_steps_run_the_kernel_and_give_the_models_tokens(
    model: GPT, prepared: GPT, block_calls: list[int]
) -> None:
    config = model.config
    prompt = [7, 8, 9, 10, 11]
    with torch.inference_mode():
        expected = list(generate_tokens(model, prompt, GREEDY))
    assert served(prepared, prompt, GREEDY) == expected  # 70 tokens: the 48-token window slides
    assert len(block_calls) >= config.n_layer * 50 and all(len(rows) == 1 for rows in block_calls)
    assert max(rows[0] for rows in block_calls) == config.block_size - 1  # up to the window's last position


def test_the_next_turn_of_a_conversation_runs_its_last_prompt_token_through_the_kernel(
    model: GPT, prepared: GPT, block_calls: list[int]
) -> None:
    config = model.config
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
    assert block_calls[: config.n_layer] == [[len(second) - 1]] * config.n_layer  # the prompt's last token


def test_a_batched_step_runs_the_kernel_with_each_rows_own_positions(model: GPT, prepared: GPT,
                                                                      block_calls: list[list[int]]) -> None:
    config = model.config
    """Rows of different lengths in one step give the logits of the model's own batched step,
    and each row's new key and value land at its own position; prefills run the block's code."""
    caches = [RowKVCache(config, 3, torch.device("cpu"), torch.float32) for _ in range(2)]
    prompts = [[4, 5, 6], list(range(10, 30)), [7]]
    with torch.inference_mode():
        for m, kv in zip((model, prepared), caches):
            for row, prompt in enumerate(prompts):
                m.forward_last(torch.tensor([prompt]), kv.row(row), 0)
        assert block_calls == []  # prefills
        tokens, pos = torch.tensor([8, 9, 10]), torch.tensor([3, 20, 1])
        expected = model.decode_rows(tokens, pos, caches[0])
        got = prepared.decode_rows(tokens, pos, caches[1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].k[:, :, :, :21], caches[0].k[:, :, :, :21], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].v[:, :, :, :21], caches[0].v[:, :, :, :21], rtol=1e-5, atol=1e-5)
    assert block_calls == [[3, 20, 1]] * config.n_layer


def test_the_kernels_gelu_matches_torchs_over_a_wide_range() -> None:
    """The MLP's pre-activations spread over about -12..12, where GELU's tanh saturates."""
    wide = sharp(GPT(CONFIG).eval(), seed=4)
    with torch.no_grad():
        for block in wide.transformer.h:
            block.mlp.c_fc.weight.mul_(60)
    prepared = prepare(wide, "float32")
    caches = [RowKVCache(CONFIG, 2, torch.device("cpu"), torch.float32) for _ in range(2)]
    with torch.inference_mode():
        pre = wide.transformer.h[0].mlp.c_fc(wide.transformer.h[0].ln_2(torch.randn(64, CONFIG.n_embd)))
        assert pre.min() < -9 and pre.max() > 9
        for m, kv in zip((wide, prepared), caches):
            for row in range(2):
                m.forward_last(torch.tensor([[3 + row, 4, 5]]), kv.row(row), 0)
        expected = wide.decode_rows(torch.tensor([6, 7]), torch.tensor([3, 3]), caches[0])
        got = prepared.decode_rows(torch.tensor([6, 7]), torch.tensor([3, 3]), caches[1])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_busy_batch_gives_each_prompt_its_tokens_alone(model: GPT, prepared: GPT, block_calls: list[list[int]],
                                                          batched_tokens: BatchedTokens) -> None:
    prompts = [[5, 6], list(range(40, 75)), [9] * 11]  # the second slides the 48-token window
    with torch.inference_mode():
        expected = [list(generate_tokens(model, p, GREEDY)) for p in prompts]
    assert batched_tokens(prepared, prompts, GREEDY) == expected
    assert max(len(rows) for rows in block_calls) == 3


def test_without_a_c_compiler_the_layers_run_their_own_code(model: GPT, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture,
                                                              tmp_path: Path) -> None:
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built before
    try:
        with caplog.at_level("WARNING", logger="model.cpu_kernels"):
            plain = prepare(model, "float32")
    finally:
        cpu_kernels.library.cache_clear()
    assert "the packed-weight kernels could not be built" in caplog.text and "no-such-cc" in caplog.text
    assert not any(isinstance(block, RowStepBlock) for block in plain.transformer.h)
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert plain.lm_head.weight.t().is_contiguous()  # MKL's faster layout for one row
    with torch.inference_mode():
        assert served(plain, [5, 6], replace(GREEDY, max_new_tokens=8)) == list(
            generate_tokens(model, [5, 6], replace(GREEDY, max_new_tokens=8))
        )


def test_a_compile_error_is_reported_with_the_compilers_message(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture,
                                                                tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="model.cpu_kernels"):
            assert not cpu_kernels.use_packed_weights(GPT(CONFIG))
    finally:
        cpu_kernels.library.cache_clear()
    assert "could not be built" in caplog.text and "error" in caplog.text
    assert list((tmp_path / "gptbot").iterdir()) == []  # no half-built library left to load later


def test_the_library_is_built_once_and_kept_for_the_next_process(tmp_path: Path) -> None:
    code = "from model import cpu_kernels\nprint(cpu_kernels.library()._name)\n"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    (tmp_path / "gptbot").mkdir()
    for stale in ("row_step-0123.so", "cpu_kernels-4567.so"):  # builds of earlier versions
        (tmp_path / "gptbot" / stale).write_bytes(b"")
    built = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                              env=env)
        path = Path(done.stdout.strip())
        built.append((path, path.stat().st_ino, path.stat().st_mtime_ns))
    assert built[0] == built[1]  # the same file, not built and renamed into place again
    assert list((tmp_path / "gptbot").iterdir()) == [built[0][0]]  # the stale builds removed


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 40])
def test_packed_products_give_the_linears_result_for_odd_sizes(kernels: ctypes.CDLL, rows: int) -> None:
    """Every tile: one row by four panels, two or three rows by two or four, then tiles of up to
    6 (AVX2) or 8 (AVX-512) rows; panels left over; a partly filled last panel; no bias."""
    lib = kernels
    torch.manual_seed(rows)
    for out_features, in_features in [(1, 1), (3, 17), (16, 16), (33, 5), (80, 33), (1030, 768)]:
        for bias in (True, False):
            linear = torch.nn.Linear(in_features, out_features, bias=bias)
            x = torch.randn(rows, in_features)
            with torch.inference_mode():
                torch.testing.assert_close(PackedLinear(linear, lib)(x), linear(x), rtol=1e-4, atol=1e-4)


def test_a_packed_linear_keeps_its_inputs_leading_dimensions_and_refuses_other_dtypes() -> None:
    linear = torch.nn.Linear(24, 40)
    packed = PackedLinear(linear, cpu_kernels.library())
    x = torch.randn(2, 5, 24).transpose(0, 1)  # not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="float32"):
            packed(x.double())


def test_a_step_past_the_cache_is_refused_not_written(prepared: GPT) -> None:
    config = prepared.config
    cache = KVCache(config, 1, torch.device("cpu"), torch.float32)
    x = torch.ones(1, 1, config.n_embd)
    with pytest.raises(ValueError, match="outside the cache.s 48"):
        prepared.transformer.h[0](x, cache, config.block_size)
    pool = RowKVCache(config, 2, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="outside the cache.s 48"):
        prepared.transformer.h[0].decode_rows(x.expand(2, 1, -1), pool, torch.tensor([3, 48]), torch.zeros(0))
    assert pool.k.count_nonzero() == 0 and pool.v.count_nonzero() == 0


def test_serving_leaves_torchs_compiler_unimported() -> None:
    """Importing torch's compiler costs a process about 110 MiB: the bot does without it."""
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
