"""The inference engine: the model in one worker thread, continuous batching, replies streamed to asyncio."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from model.batching import Batcher, BatchStats, Event, Request
from model.checkpoint import LoadedModel
from model.generate import SamplingParams
from model.inference_weights import choose_precision, prepare
from model.kv_pool import kv_dtype
from model.reply_text import ReplyText
from model.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

# torch's intra-op threads as this module is imported (torch's own default unless set before):
# what the engine's worker uses when given torch_threads=0
TORCH_DEFAULT_THREADS = torch.get_num_threads()


class EngineBusy(Exception):
    """More requests are waiting than the engine accepts; the caller should answer "busy"."""


class EngineError(RuntimeError):
    """The engine could not answer: it is closed, or the model failed (the cause is chained)."""


class ModelInfo(Protocol):
    """What the bot reads of the model behind an engine: a LoadedModel, or a remote engine's RemoteModel."""

    @property
    def tokenizer(self) -> ChatTokenizer: ...

    @property
    def name(self) -> str: ...


class ReplyEngine(Protocol):
    """What the session manager and /readyz need of an engine, so the model can run here or elsewhere.

    InferenceEngine and model.remote_engine.RemoteEngine both fit. stream raises EngineBusy
    (before any text) when the engine takes no more work, and EngineError when it cannot answer.
    """

    @property
    def loaded(self) -> ModelInfo: ...

    @property
    def context_size(self) -> int: ...

    @property
    def running(self) -> bool: ...

    @property
    def waiting(self) -> int: ...

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_key: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> AsyncIterator[str]:
        """The reply's text pieces as they come; closing the iterator early cancels the request.

        prompt_ids is the whole prompt, rendered; messages ({"role", "content"} dicts), given for
        models with a chat template, is the same conversation for an engine that renders it itself.
        """
        ...

    def close(self) -> None: ...


@dataclass(eq=False, kw_only=True)
class _Submitted(Request):
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[int | str | BaseException | None]


class InferenceEngine:
    """Answers many conversations at once from one worker thread that owns the model.

    Callers on the event loop submit requests and read their text back as it is produced;
    the event loop never runs model code. The worker schedules per decoding step (see
    model.batching): new requests join the running batch after their prefill, finished
    ones leave at once, and closing a stream stops its request at the next step. With a
    cache_key (the conversation), the keys and values of the previous turn are kept,
    least recently used evicted first, so the next turn only prefills its new tokens.

    Options: max_waiting requests may wait for a batch row (more raise EngineBusy at once);
    max_batch sequences decode together; cache_mb bounds the conversation cache; at most
    prefill_chunk prompt tokens run between two decoding steps; torch_threads (0 = torch's
    default) for CPU; precision is one of inference_weights.PRECISIONS, or auto (see
    inference_weights.choose_precision); kv_precision is one of kv_pool.KV_PRECISIONS, what the
    key/value pool and the conversation cache hold. The engine works on its own copy of the
    weights (see model.inference_weights), on the model's device.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_waiting: int = 64,
        torch_threads: int = 0,
        max_batch: int = 16,
        cache_mb: int = 256,
        prefill_chunk: int = 256,
        precision: str = "float32",
        kv_precision: str = "auto",
    ) -> None:
        device = loaded.model.transformer.wte.weight.device.type
        chosen = choose_precision(precision, loaded.stored_as, device)
        model = prepare(loaded.model, chosen)
        self.loaded = replace(loaded, model=model)
        self.max_waiting = max_waiting
        self.max_batch, self.cache_mb, self.prefill_chunk, self.precision = max_batch, cache_mb, prefill_chunk, chosen
        self.kv_dtype = kv_dtype(kv_precision, model.transformer.wte.weight.dtype)
        self._torch_threads = torch_threads
        self._batcher = Batcher(model, max_batch=max_batch, cache_bytes=cache_mb * 2**20, prefill_chunk=prefill_chunk,
                                kv_dtype=self.kv_dtype)
        pool = self._batcher.kv
        how = f"{chosen} (auto: weights stored as {loaded.stored_as})" if precision == "auto" else chosen
        pool_type = "" if self.kv_dtype == torch.float32 else f" {str(self.kv_dtype).removeprefix('torch.')}"
        log.info(
            "inference engine: %s on %s, %d batch rows x %d positions (KV pool %.0f MiB%s), conversation cache %d MiB",
            how, self._batcher.device, pool.rows, self.context_size,
            pool.rows * self.context_size * pool.bytes_per_token() / 2**20, pool_type, cache_mb,
        )
        self._inbox: list[_Submitted] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self._thread.start()

    @property
    def context_size(self) -> int:
        return self.loaded.config.block_size

    @property
    def running(self) -> bool:
        """Whether the worker takes requests: the model is loaded and the engine not closed (for /readyz)."""
        return not self._closed and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Requests not yet given a batch row: the queue depth of /metrics."""
        return self.stats().waiting

    def stats(self) -> BatchStats:
        """A snapshot of the queue, the batch, the conversation cache and the work done so far."""
        with self._wake:
            stats = self._batcher.stats()
            return replace(stats, waiting=stats.waiting + len(self._inbox))

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_key: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> AsyncIterator[str]:
        """Generate a reply to prompt_ids, yielding UTF-8-safe text pieces as the model produces them.

        As generate.stream_text: any special token, a stop id or a stop string ends the reply.
        Raises EngineBusy (before any text) when too many requests wait. messages is not read:
        prompt_ids already are the conversation rendered with the model's chat template.
        """
        tokenizer = self.loaded.tokenizer
        params = replace(params, stop_ids=(*params.stop_ids, *sorted(tokenizer.special_ids)))
        text = ReplyText(tokenizer, params.stop_strings)
        async with aclosing(self._submit(prompt_ids, params, cache_key, text)) as items:
            async for item in items:
                assert isinstance(item, str)
                yield item

    async def stream_tokens(
        self, prompt_ids: list[int], params: SamplingParams, cache_key: str | None = None
    ) -> AsyncIterator[int]:
        """Generate new token ids as generate.generate_tokens does: until a stop id or max_new_tokens."""
        async with aclosing(self._submit(prompt_ids, params, cache_key, None)) as items:
            async for item in items:
                assert isinstance(item, int)
                yield item

    def close(self) -> None:
        """Stop the worker; requests still running end with EngineError. Safe to call twice."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    async def _submit(
        self, prompt_ids: list[int], params: SamplingParams, cache_key: str | None, text: ReplyText | None
    ) -> AsyncIterator[int | str]:
        vocab = self.loaded.config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if not all(0 <= i < vocab for i in prompt_ids):
            raise ValueError(f"prompt ids must lie in [0, {vocab})")
        request = _Submitted(
            prompt_ids=list(prompt_ids), params=params, cache_key=cache_key, text=text,
            loop=asyncio.get_running_loop(), queue=asyncio.Queue(),
        )
        with self._wake:
            if self._closed:
                raise EngineError("the inference engine is closed")
            waiting = len(self._inbox) + self._batcher.stats().waiting
            if waiting >= self.max_waiting:
                raise EngineBusy(f"{waiting} requests are already waiting")
            self._inbox.append(request)
            self._wake.notify()
        try:
            while (item := await request.queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                yield item
        finally:
            request.cancelled = True  # a no-op when it has ended; else it leaves at the next step

    def _work(self) -> None:
        # per thread under OpenMP: set here, torch's default too, as a new thread starts with the
        # count last set in any thread (one, by leave_threads_to_the_engine)
        torch.set_num_threads(self._torch_threads or TORCH_DEFAULT_THREADS)
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._inbox and self._batcher.idle:
                        self._wake.wait()
                    if self._closed:
                        break
                    arrivals, self._inbox = self._inbox, []
                    refused = self._add_all(arrivals)
                try:
                    events = self._batcher.step()
                except Exception as exc:  # a batched step failed: every running request gets the cause
                    events = self._batcher.fail_all(exc)
                _deliver(refused + events)
        with self._wake:
            leftovers, self._inbox = self._inbox, []
            refused = self._add_all(leftovers)
            _deliver(refused + self._batcher.fail_all(EngineError("the inference engine was closed")))

    def _add_all(self, requests: list[_Submitted]) -> list[Event]:
        """Hand requests to the batcher; one it cannot take ends with the cause, never the worker."""
        refused: list[Event] = []
        for request in requests:
            try:
                self._batcher.add(request)
            except Exception as exc:
                refused.append((request, exc))
        return refused


def leave_threads_to_the_engine() -> None:
    """Give the calling thread's torch work one thread: intra-op parallelism is the engine worker's.

    libgomp keeps a team of OpenMP threads for every thread that ever ran a parallel region, and
    once the process has more such threads than CPUs it stops spinning between regions: every
    parallel region then waits tens of microseconds for its threads to wake. Call this in every
    thread that runs torch besides the engine's (the one that loads the model, say) before it
    does. Measured on 2 CPUs, the shipped model's 16 conversations: 2,850 tok/s, against 1,800
    when the loading thread had run one parallel region of its own.
    """
    torch.set_num_threads(1)


def _deliver(events: list[Event]) -> None:
    """Hand events to their requests' event loops: one wake-up per loop and step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Submitted, int | str | BaseException | None]]] = {}
    for request, item in events:
        assert isinstance(request, _Submitted)
        by_loop.setdefault(request.loop, []).append((request, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop is closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[_Submitted, int | str | BaseException | None]]) -> None:
    for request, item in items:
        request.queue.put_nowait(item)
