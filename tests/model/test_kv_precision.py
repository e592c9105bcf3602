"""A key/value pool in float16 (BOT_KV_PRECISION): the C decoding step against PyTorch over the same
rounded keys and values, the same greedy tokens alone, in a busy batch and after a cached turn,
half the bytes, and the setting's checks."""

import ctypes
import logging
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from bot.config import Settings, describe_error
from conftest import served, sharp
from model.batching import Batcher
from model.checkpoint import LoadedModel
from model.config import GPTConfig
from model.cpu_kernels import RowStepBlock
from model.engine import InferenceEngine
from model.generate import SamplingParams
from model.gpt import GPT, KVCache
from model.inference_weights import prepare
from model.kv_pool import RowKVCache, kv_dtype
from model.tokenizer import ChatTokenizer
from run_bot import engine_options

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=40)
GPT2 = GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=4, n_embd=96)
# rotary positions, RMSNorm, SwiGLU, 2 key/value heads for 4 query heads (grouped-query attention)
LLAMA = GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=4, n_embd=96, pos_encoding="rope",
                  norm="rmsnorm", mlp="swiglu", n_kv_head=2, n_inner=136, bias=False, qkv_bias=True,
                  tie_embeddings=False)
CONFIGS = pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
CPU = torch.device("cpu")


def sharp_model(config: GPTConfig) -> GPT:
    """A model whose attention picks positions: a rounded key changes its output (see sharp)."""
    torch.manual_seed(3)
    return sharp(GPT(config).eval(), seed=3)


def prefilled(model: GPT, prompts: list[list[int]], dtype: torch.dtype) -> RowKVCache:
    """A pool of dtype with prompt i prefilled into row i."""
    pool = RowKVCache(model.config, len(prompts), CPU, dtype)
    for row, prompt in enumerate(prompts):
        model.forward_last(torch.tensor([prompt]), pool.row(row), 0)
    return pool


@CONFIGS
def test_the_c_step_over_a_float16_pool_matches_torch_over_the_same_rounded_keys(kernels: ctypes.CDLL,
                                                                                config: GPTConfig) -> None:
    """Rows of different lengths, the AVX-512 and the AVX2 builds: the kernel stores each row's new key
    and value rounded as torch rounds them, and its logits are those of torch's attention over the
    widened pool, far closer than those of a float32 pool."""
    model = sharp_model(config)
    prepared = prepare(model, "float32")
    assert all(isinstance(b, RowStepBlock) and b._lib is kernels for b in prepared.transformer.h)
    prompts = [[4, 5, 6], list(range(10, 30)), [7]]
    tokens, pos = torch.tensor([8, 9, 10]), torch.tensor([3, 20, 1])
    with torch.inference_mode():
        ours = prefilled(prepared, prompts, torch.float16)
        theirs = RowKVCache(config, 3, CPU, torch.float16)
        theirs.k.copy_(ours.k)  # the same rounded prefixes
        theirs.v.copy_(ours.v)
        got = prepared.decode_rows(tokens, pos, ours)
        expected = model.decode_rows(tokens, pos, theirs)
        unrounded = model.decode_rows(tokens, pos, prefilled(model, prompts, torch.float32))
    assert ours.k.dtype == torch.float16 and ours.k[:, :, :, 21:].count_nonzero() == 0
    # a float32 key that lies within torch's and the kernel's last-bit difference (1e-5 in the
    # second layer) of a rounding boundary may round the other way: one float16 step, 2^-10 of it
    torch.testing.assert_close(ours.k.float(), theirs.k.float(), rtol=2**-10, atol=1e-5)
    torch.testing.assert_close(ours.v.float(), theirs.v.float(), rtol=2**-10, atol=1e-5)
    # the plain C build sums in another order: up to 3e-5 apart, where a float32 pool is 1e-4 or more
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)
    assert (unrounded - expected).abs().max() > 2 * (got - expected).abs().max()


def test_a_lone_streams_step_reads_and_writes_a_float16_cache_in_c() -> None:
    """generate's KVCache (one sequence, one token a step) in float16, through RowStepBlock.forward."""
    model = sharp_model(LLAMA)
    prepared = prepare(model, "float32")
    caches = [KVCache(LLAMA, 1, CPU, torch.float16) for _ in range(2)]
    with torch.inference_mode():
        prefix = torch.tensor([list(range(30, 36))])
        prepared.forward_last(prefix, caches[0], 0)
        for layer in range(LLAMA.n_layer):
            caches[1].k[layer].copy_(caches[0].k[layer])
            caches[1].v[layer].copy_(caches[0].v[layer])
        got = prepared.forward_last(torch.tensor([[7]]), caches[0], 6)
        expected = model.forward_last(torch.tensor([[7]]), caches[1], 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].k[1].float(), caches[1].k[1].float(), rtol=2**-10, atol=1e-5)


@CONFIGS
def test_greedy_tokens_with_a_float16_pool_are_the_same_alone_and_inside_a_busy_batch(config: GPTConfig) -> None:
    """In C and in torch's own attention; the second prompt slides the 40-token window."""
    model = sharp_model(config)
    prepared = prepare(model, "float32")
    prompts = [[5, 6], list(range(40, 75)), [9] * 11, [7]]
    alone = served(prepared, prompts, GREEDY, max_batch=1, kv_dtype=torch.float16)
    assert served(prepared, prompts, GREEDY, max_batch=3, kv_dtype=torch.float16) == alone
    assert served(model, prompts, GREEDY, max_batch=3, kv_dtype=torch.float16) == alone
    assert all(len(t) == GREEDY.max_new_tokens for t in alone)


@CONFIGS
def test_the_next_turn_reuses_a_float16_cached_turn_with_the_same_tokens(config: GPTConfig) -> None:
    model = prepare(sharp_model(config), "float32")
    params = replace(GREEDY, max_new_tokens=8)
    batcher = Batcher(model, max_batch=2, cache_bytes=2**22, prefill_chunk=16, kv_dtype=torch.float16)
    first = [5, 6, 7]
    second = first + served(model, [first], params, max_batch=2, batcher=batcher, cache_key="c")[0] + [11, 12]
    cached = batcher.conversations.take("c")
    assert cached is not None and cached.kv.dtype == torch.float16 and len(cached.ids) == len(second) - 3
    batcher.conversations.put("c", cached)
    again = served(model, [second], params, max_batch=2, batcher=batcher, cache_key="c")
    assert batcher.stats().reused_tokens == len(second) - 3  # all but the reply's last token and the new ones
    assert again == served(model, [second], params, max_batch=1, kv_dtype=torch.float16)  # prefilled from scratch


def test_a_float16_pool_and_its_cached_turns_take_half_the_bytes() -> None:
    pools = {dtype: RowKVCache(LLAMA, 4, CPU, dtype) for dtype in (torch.float32, torch.float16)}
    assert pools[torch.float16].k.nbytes * 2 == pools[torch.float32].k.nbytes
    assert pools[torch.float16].bytes_per_token() * 2 == pools[torch.float32].bytes_per_token()
    turns = [pool.read_row(1, 10) for pool in pools.values()]
    assert turns[1].nbytes * 2 == turns[0].nbytes


def test_the_setting_reaches_the_pool_and_the_log(chat_tokenizer: ChatTokenizer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    model = sharp_model(GPT2)
    loaded = LoadedModel(model=model, tokenizer=chat_tokenizer, name="tiny", config=model.config)
    options = engine_options(Settings(_env_file=None, kv_precision="float16", max_batch=2))
    with caplog.at_level(logging.INFO, logger="model.engine"):
        engine = InferenceEngine(loaded, **options)
    try:
        assert engine.kv_dtype == torch.float16 and engine._batcher.kv.k.dtype == torch.float16
    finally:
        engine.close()
    assert "MiB float16)" in caplog.text


def test_auto_keeps_the_weights_dtype() -> None:
    """float32 on CPU as before; bfloat16 where the weights are (CUDA)."""
    assert kv_dtype("auto", torch.float32) == torch.float32
    assert kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_dtype("float16", torch.float32) == torch.float16


@pytest.mark.parametrize("value", ["bfloat16", "half", "q8"])
def test_a_bad_setting_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BOT_KV_PRECISION", value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    message = describe_error(caught.value)
    assert message.startswith(f"BOT_KV_PRECISION='{value}': Input should be 'auto', 'float32' or 'float16'")
    assert "\n" not in message
    with pytest.raises(ValueError, match="key/value precision must be one of"):
        kv_dtype(value, torch.float32)


def test_a_row_step_refuses_a_pool_it_cannot_read(make_model: Callable[..., GPT]) -> None:
    prepared = prepare(make_model(), "float32")
    pool = RowKVCache(prepared.config, 2, CPU, torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float16, not torch.bfloat16"):
        prepared.transformer.h[0].decode_rows(torch.ones(2, 1, 32), pool, torch.tensor([3, 4]), torch.zeros(0))
