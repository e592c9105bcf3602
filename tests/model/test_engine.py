"""The inference engine: batching against the reference decoder, independence, cancellation, queue, cache reuse."""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import replace

import pytest
import torch

from model.checkpoint import LoadedModel
from model.batching import Batcher, Request
from model.conversation_cache import CachedTurn, ConversationCache
from model.engine import TORCH_DEFAULT_THREADS, EngineBusy, EngineError, InferenceEngine, leave_threads_to_the_engine
from model.generate import SamplingParams, generate_tokens, stream_text
from model.gpt import GPT
from model.inference_weights import prepare
from model.tokenizer import ChatTokenizer

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=20)
# lengths around the tiny model's 32-token window: the longer ones slide while decoding
PROMPT_LENGTHS = (1, 4, 9, 17, 25, 31, 40)


@pytest.fixture
def tiny(make_model: Callable[..., GPT], chat_tokenizer: ChatTokenizer) -> LoadedModel:
    model = make_model()
    return LoadedModel(model=model, tokenizer=chat_tokenizer, name="tiny", config=model.config)


@contextmanager
def engine_for(loaded: LoadedModel, **options: object) -> Iterator[InferenceEngine]:
    engine = InferenceEngine(loaded, **options)  # type: ignore[arg-type]
    try:
        yield engine
    finally:
        engine.close()


def prompts(n: int = len(PROMPT_LENGTHS), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (length,), generator=g).tolist() for length in PROMPT_LENGTHS[:n]]


def reference(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    return list(generate_tokens(model, prompt, params))


async def collect(items: AsyncIterator[object]) -> list[object]:
    async with aclosing(items) as stream:
        return [item async for item in stream]


async def staggered(engine: InferenceEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[object]]:
    """Run requests concurrently, each submitted a little after the one before."""

    async def one(i: int, prompt: list[int], params: SamplingParams) -> list[object]:
        await asyncio.sleep(0.002 * i)
        return await collect(engine.stream_tokens(prompt, params))

    return list(await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(requests))))


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


async def test_greedy_tokens_equal_the_reference_alone_and_inside_a_busy_batch(tiny: LoadedModel) -> None:
    # different lengths make requests leave at different steps; 3 rows for 7 requests make the
    # later ones wait and join while the others decode
    requests = [(p, replace(GREEDY, max_new_tokens=8 + 5 * i)) for i, p in enumerate(prompts())]
    expected = [reference(tiny.model, p, s) for p, s in requests]
    with engine_for(tiny, max_batch=3, prefill_chunk=16) as engine:
        alone = [await collect(engine.stream_tokens(p, s)) for p, s in requests]
        together = await staggered(engine, requests)
        stats = engine.stats()
    assert alone == expected
    assert together == expected
    assert stats.running == 0 and stats.waiting == 0
    assert stats.decode_steps < stats.decoded_tokens  # steps really ran several rows at once


async def test_seeded_sampling_does_not_depend_on_what_else_is_in_the_batch(tiny: LoadedModel) -> None:
    mine = (prompts()[3], SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=25, seed=7))
    others = [
        (prompts(seed=2)[0], SamplingParams(temperature=1.2, top_k=0, top_p=1.0, max_new_tokens=30, seed=1)),
        (prompts(seed=2)[4], GREEDY),
        (prompts(seed=2)[2], SamplingParams(temperature=0.5, top_k=5, repetition_penalty=2.0, max_new_tokens=9)),
        (prompts(seed=2)[5], SamplingParams(temperature=0.9, top_k=40, top_p=0.9, max_new_tokens=40, seed=8)),
    ]
    with engine_for(tiny, max_batch=8) as engine:
        alone = await collect(engine.stream_tokens(*mine))
        busy = await staggered(engine, [others[0], others[1], mine, others[2], others[3]])
    assert busy[2] == alone
    assert len(alone) == 25 and busy[3] != busy[4]


async def test_text_pieces_equal_stream_text_with_stop_strings(tiny: LoadedModel) -> None:
    prompt = tiny.tokenizer.encode("Hello there! How are you doing today?")
    params = replace(GREEDY, repetition_penalty=1.0, max_new_tokens=30)
    full = "".join(stream_text(tiny.model, tiny.tokenizer, prompt, params))
    assert len(full) > 6  # the test needs text to cut
    cases = [params, replace(params, stop_strings=(full[4:6],)), replace(params, stop_strings=("no such text",))]
    with engine_for(tiny) as engine:
        for case in cases:
            expected = list(stream_text(tiny.model, tiny.tokenizer, prompt, case))
            got = await collect(engine.stream(prompt, case))
            assert "".join(got) == "".join(expected)
            assert all(got)  # no empty pieces
    assert "".join(got) == full


async def test_closing_a_stream_stops_its_generation_at_the_next_step(tiny: LoadedModel) -> None:
    endless = replace(GREEDY, max_new_tokens=100_000)
    with engine_for(tiny, max_batch=2) as engine:
        other = asyncio.create_task(collect(engine.stream_tokens(prompts()[2], replace(GREEDY, max_new_tokens=60))))
        async with aclosing(engine.stream_tokens(prompts()[1], endless)) as stream:
            async for _ in stream:
                break
        await wait_until(lambda: engine.stats().running <= 1)
        assert await other == reference(tiny.model, prompts()[2], replace(GREEDY, max_new_tokens=60))
        decoded = engine.stats().decoded_tokens
        await asyncio.sleep(0.05)
        assert engine.stats().decoded_tokens == decoded and engine.stats().running == 0


async def test_a_request_given_up_while_waiting_never_runs(tiny: LoadedModel) -> None:
    with engine_for(tiny, max_batch=1) as engine:
        running = engine.stream_tokens(prompts()[1], replace(GREEDY, max_new_tokens=100_000))
        await anext(running)
        waiting = asyncio.create_task(collect(engine.stream_tokens(prompts()[2], GREEDY)))
        await wait_until(lambda: engine.stats().waiting == 1)
        waiting.cancel()
        await wait_until(lambda: engine.stats().waiting == 0)
        prefilled = engine.stats().prefilled_tokens
        await running.aclose()
        await wait_until(lambda: engine.stats().running == 0)
        assert engine.stats().prefilled_tokens == prefilled  # its prompt never went through the model


async def test_a_full_queue_is_reported_at_once(tiny: LoadedModel) -> None:
    endless = replace(GREEDY, max_new_tokens=100_000)
    with engine_for(tiny, max_batch=1, max_waiting=1) as engine:
        running = engine.stream_tokens(prompts()[1], endless)
        await anext(running)  # it holds the only batch row
        waiting = asyncio.create_task(collect(engine.stream_tokens(prompts()[2], GREEDY)))
        await wait_until(lambda: engine.stats().waiting == 1)
        with pytest.raises(EngineBusy):
            await collect(engine.stream([1, 2], GREEDY))
        await running.aclose()
        assert await waiting == reference(tiny.model, prompts()[2], GREEDY)  # it got the row


async def test_a_continued_conversation_reuses_its_cache_and_equals_a_fresh_prefill(tiny: LoadedModel) -> None:
    params = replace(GREEDY, max_new_tokens=6)
    turn1 = prompts()[2]  # 9 tokens
    with engine_for(tiny) as engine:
        reply1 = await collect(engine.stream_tokens(turn1, params, cache_key="c1"))
        assert engine.stats().cached_conversations == 1
        turn2 = turn1 + reply1 + [7, 8, 9]  # the history as the next prompt gives it, and a new message
        before = engine.stats()
        reply2 = await collect(engine.stream_tokens(turn2, params, cache_key="c1"))
        after = engine.stats()
        # every token with keys and values in the cache (the last reply token never was fed)
        reused = len(turn1) + len(reply1) - 1
        assert after.reused_tokens - before.reused_tokens == reused
        assert after.prefilled_tokens - before.prefilled_tokens == len(turn2) - reused
        assert reply2 == reference(tiny.model, turn2, params)

        # a prompt that changes earlier history reuses only the common start, still correctly
        edited = turn2[:4] + [1, 2, 3] + turn2[4:]
        assert await collect(engine.stream_tokens(edited, params, cache_key="c1")) == reference(tiny.model, edited, params)
        assert engine.stats().reused_tokens - after.reused_tokens == 4
        # another conversation, or none, reuses nothing
        for key in ("c2", None):
            before = engine.stats()
            await collect(engine.stream_tokens(turn2, params, cache_key=key))
            assert engine.stats().reused_tokens == before.reused_tokens


def test_conversation_cache_evicts_least_recently_used_within_its_bytes() -> None:
    def turn(n: int) -> CachedTurn:
        return CachedTurn(tuple(range(n)), torch.zeros(2, 1, 1, n, 4))  # 32 bytes per token

    cache = ConversationCache(max_bytes=32 * 10)
    cache.put("a", turn(4))
    cache.put("b", turn(4))
    cache.put("a", turn(5))  # a replaced: now the most recent
    assert cache.nbytes == 32 * 9
    cache.put("c", turn(3))  # needs room: b, the least recent, goes
    assert cache.take("b") is None and cache.nbytes == 32 * 8
    cache.put("huge", turn(11))  # larger than the whole budget: not kept, nothing evicted
    assert len(cache) == 2 and cache.take("a") is not None and cache.take("c") is not None
    assert cache.nbytes == 0


def test_conversation_cache_hands_out_the_buffers_of_entries_that_left_within_its_bytes() -> None:
    cache = ConversationCache(max_bytes=4 * 1000)
    fresh = cache.buffer(100, torch.float32, torch.device("cpu"))
    assert 100 <= fresh.numel() <= 100 * 9 // 8  # room for a slightly longer later turn
    entry = CachedTurn(tuple(range(10)), fresh[:100].view(2, 1, 1, 10, 5))
    assert entry.nbytes == fresh.nbytes  # the whole buffer counts against the bound
    cache.put("a", entry)
    cache.release(cache.take("a"))  # its keys and values were copied into a batch row
    assert cache.nbytes == 0 and cache.spare_bytes == fresh.nbytes
    again = cache.buffer(90, torch.float32, torch.device("cpu"))  # smaller fits
    assert again.data_ptr() == fresh.data_ptr() and cache.spare_bytes == 0
    assert cache.buffer(90, torch.float64, torch.device("cpu")).dtype == torch.float64  # no spare of that kind

    cache.release(CachedTurn((), again[:90].view(2, 1, 1, 9, 5)))
    big = cache.buffer(900, torch.float32, torch.device("cpu"))  # too large for the spare: a new one
    assert big.data_ptr() != fresh.data_ptr()
    cache.put("b", CachedTurn((), big[:900].view(2, 1, 1, 90, 5)))  # room for it: the spare goes first
    assert len(cache) == 1 and cache.spare_bytes == 0
    assert cache.nbytes + cache.spare_bytes <= cache.max_bytes

    few = ConversationCache(max_bytes=2**20, max_spares=2)
    for n in (300, 100, 200):
        few.release(CachedTurn((), torch.empty(n)))
    assert few.spare_bytes == 4 * (300 + 200)  # the largest two
    assert [few.buffer(1, torch.float32, torch.device("cpu")).numel() for _ in range(3)] == [200, 300, 1]


def test_a_conversations_next_turn_writes_into_its_last_turns_buffer(tiny: LoadedModel) -> None:
    """A fresh buffer of tens of MB costs its page faults at every turn's end; a reused one does not."""
    params = replace(GREEDY, max_new_tokens=6)
    prompt = prompts()[3]
    batcher = Batcher(prepare(tiny.model, "float32"), max_batch=2, cache_bytes=2**20, prefill_chunk=64)
    held, replies = [], []  # held: every turn's keys and values, so no buffer is freed and its address reused
    with torch.inference_mode():
        for _ in range(3):
            request = Request(prompt_ids=prompt, params=params, cache_key="c")
            batcher.add(request)
            reply = []
            while not batcher.idle:
                reply += [item for r, item in batcher.step() if r is request and isinstance(item, int)]
            replies.append(reply)
            entry = batcher.conversations.take("c")
            assert entry is not None
            held.append(entry.kv)
            batcher.conversations.put("c", entry)
    assert replies == [reference(tiny.model, prompt, params)] * 3
    assert batcher.stats().reused_tokens > 0
    # each turn ended in the buffer of the one before, handed back when its keys and values were copied out
    assert len({kv.untyped_storage().data_ptr() for kv in held}) == 1


async def test_bad_prompts_and_a_closed_engine_raise_clear_errors(tiny: LoadedModel) -> None:
    engine = InferenceEngine(tiny)
    for bad in ([], [0, 400], [-1]):
        with pytest.raises(ValueError):
            await collect(engine.stream_tokens(bad, GREEDY))
    assert await collect(engine.stream_tokens([1], replace(GREEDY, max_new_tokens=0))) == []
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        await collect(engine.stream([1, 2], GREEDY))


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
async def test_every_precision_runs_on_a_copy(tiny: LoadedModel, precision: str) -> None:
    original = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with engine_for(tiny, precision=precision) as engine:
        assert engine.loaded.model is not tiny.model
        got = await staggered(engine, [(p, GREEDY) for p in prompts(3)])
    assert [len(tokens) for tokens in got] == [20, 20, 20]
    assert all(torch.equal(v, original[k]) for k, v in tiny.model.state_dict().items())
    with pytest.raises(ValueError, match="precision"):
        InferenceEngine(tiny, precision="float8")


def test_the_worker_owns_torchs_threads_while_the_loading_thread_keeps_one(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One OpenMP team per process: a second one makes libgomp stop spinning between parallel regions."""
    seen: list[int] = []  # torch threads of the thread that runs the model
    forward_last = GPT.forward_last

    def recording(self: GPT, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return forward_last(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GPT, "forward_last", recording)
    found: dict[str, object] = {}

    def loading_thread() -> None:  # not pytest's thread, whose torch threads other tests need
        leave_threads_to_the_engine()
        found["loading"] = torch.get_num_threads()
        for threads in (0, 2):
            with engine_for(tiny, torch_threads=threads) as engine:
                asyncio.run(collect(engine.stream_tokens([1, 2, 3], replace(GREEDY, max_new_tokens=2))))
            found[f"worker {threads}"] = set(seen)
            seen.clear()

    thread = threading.Thread(target=loading_thread)
    thread.start()
    thread.join()
    assert found["loading"] == 1
    # torch's default, though a new thread starts with the count last set anywhere (here one)
    assert found["worker 0"] == {TORCH_DEFAULT_THREADS}
    assert found["worker 2"] == {2}
