"""The inference engine when the model fails: one request's failure ends that request alone."""

import asyncio
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from model.checkpoint import LoadedModel
from model.engine import EngineError, InferenceEngine
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT, KVCache
from model.kv_pool import RowKVCache
from model.tokenizer import ChatTokenizer

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=8)
POISON = 399  # a prompt holding this token id runs out of memory in its prefill


class Fragile(GPT):
    """Our GPT with a real deployment's failures on cue, raised as CUDA raises them (torch.OutOfMemoryError).

    A decoding step of more than max_rows rows runs out of memory, as does any row at a
    position of too_long or more, and the prefill of a prompt that holds POISON.
    """

    max_rows = 1_000
    too_long = 1_000

    def forward_last(self, idx: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        if bool((idx == POISON).any()):
            raise torch.OutOfMemoryError("out of memory (this prompt)")
        return super().forward_last(idx, kv_cache, start_pos)

    def decode_rows(self, tokens: Tensor, pos: Tensor, cache: RowKVCache) -> Tensor:
        if tokens.size(0) > self.max_rows:
            raise torch.OutOfMemoryError(f"out of memory ({tokens.size(0)} rows)")
        if int(pos.max()) >= self.too_long:
            raise torch.OutOfMemoryError("out of memory (a long row)")
        return super().decode_rows(tokens, pos, cache)


def fragile(make_model: Callable[..., GPT], tokenizer: ChatTokenizer, **failures: int) -> tuple[GPT, LoadedModel]:
    """A tiny reference model and a Fragile copy of it with the given thresholds."""
    reference = make_model()
    model = Fragile(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    for name, value in failures.items():
        setattr(model, name, value)
    return reference, LoadedModel(model=model, tokenizer=tokenizer, name="fragile", config=model.config)


async def outcome(engine: InferenceEngine, prompt: list[int], params: SamplingParams, delay: float) -> tuple[list[int], Exception | None]:
    """The tokens a request got, and the error that ended it if one did."""
    await asyncio.sleep(delay)
    got: list[int] = []
    try:
        async for token in engine.stream_tokens(prompt, params):
            got.append(token)
    except (EngineError, ValueError) as exc:
        return got, exc
    return got, None


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, POISON, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_a_batch_that_runs_out_of_memory_goes_on_row_by_row(
    make_model: Callable[..., GPT], chat_tokenizer: ChatTokenizer
) -> None:
    reference, loaded = fragile(make_model, chat_tokenizer, max_rows=1)
    requests = [(prompt(n, seed), replace(GREEDY, max_new_tokens=6 + seed)) for seed, n in enumerate((3, 9, 17, 30))]
    engine = InferenceEngine(loaded, max_batch=4)
    try:
        results = await asyncio.gather(*(outcome(engine, p, s, 0.002 * i) for i, (p, s) in enumerate(requests)))
        stats = engine.stats()
    finally:
        engine.close()
    assert [error for _, error in results] == [None] * 4
    assert [tokens for tokens, _ in results] == [list(generate_tokens(reference, p, s)) for p, s in requests]
    assert stats.decode_steps < stats.decoded_tokens, "the rows really were in one batch"


async def test_requests_that_break_the_model_fail_alone_and_the_rest_of_the_batch_is_exact(
    make_model: Callable[..., GPT], chat_tokenizer: ChatTokenizer
) -> None:
    reference, loaded = fragile(make_model, chat_tokenizer, too_long=28)
    healthy = [(prompt(4, 1), GREEDY), (prompt(9, 2), replace(GREEDY, max_new_tokens=12))]
    long_one = (prompt(25, 3), GREEDY)  # its decoding reaches position 28 after 3 steps
    poisoned = (prompt(6, 4) + [POISON], GREEDY)
    out_of_vocabulary = ([5, 400], GREEDY)
    requests = [healthy[0], long_one, poisoned, out_of_vocabulary, healthy[1]]
    engine = InferenceEngine(loaded, max_batch=8)
    try:
        results = await asyncio.gather(*(outcome(engine, p, s, 0.002 * i) for i, (p, s) in enumerate(requests)))
        after = await outcome(engine, *healthy[0], 0)
    finally:
        engine.close()
    (first, error_1), (long_tokens, long_error), (_, poison_error), (_, vocab_error), (second, error_2) = results
    assert (error_1, error_2) == (None, None)
    assert first == list(generate_tokens(reference, *healthy[0]))
    assert second == list(generate_tokens(reference, *healthy[1]))
    assert isinstance(long_error, EngineError) and isinstance(long_error.__cause__, torch.OutOfMemoryError)
    assert long_tokens == list(generate_tokens(reference, *long_one))[:4], "it failed where it reached position 28"
    assert isinstance(poison_error, EngineError) and isinstance(poison_error.__cause__, torch.OutOfMemoryError)
    assert isinstance(vocab_error, ValueError)
    assert after == (first, None), "the engine goes on serving"


async def test_a_request_the_batcher_cannot_take_fails_alone_and_the_engine_goes_on(
    make_model: Callable[..., GPT], chat_tokenizer: ChatTokenizer
) -> None:
    reference, loaded = fragile(make_model, chat_tokenizer)
    # A seed past SamplingParams' check (a caller's bug): torch.Generator.manual_seed raises on it.
    bad_seed = replace(GREEDY, seed=1)
    object.__setattr__(bad_seed, "seed", 2**64)
    healthy = (prompt(5, 1), GREEDY)
    engine = InferenceEngine(loaded)
    try:
        async with asyncio.timeout(30):  # a dead worker would leave every request waiting for ever
            (bad_tokens, bad_error), (first, error) = await asyncio.gather(
                outcome(engine, prompt(7, 2), bad_seed, 0), outcome(engine, *healthy, 0.002)
            )
            after = await outcome(engine, *healthy, 0)
        running = engine.running
    finally:
        engine.close()
    assert bad_tokens == [] and isinstance(bad_error, EngineError) and bad_error.__cause__ is not None
    assert (first, error) == (list(generate_tokens(reference, *healthy)), None)
    assert after == (first, None) and running, "the engine goes on serving"
