"""The inference engine: owns the model in one worker thread and streams replies to asyncio callers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from model.checkpoint import LoadedModel
from model.generate import SamplingParams, stream_text

log = logging.getLogger(__name__)

_DONE = object()


class EngineBusy(Exception):
    """More requests are waiting than the engine accepts; the caller should answer "busy"."""


class InferenceEngine:
    """Runs generation requests one after another on the model's own thread.

    The event loop never runs model code: each request's text pieces travel back
    through an asyncio queue, and closing the stream stops its generation at the
    next token.
    """

    def __init__(self, loaded: LoadedModel, *, max_waiting: int = 64, torch_threads: int = 0) -> None:
        self.loaded = loaded
        self.max_waiting = max_waiting
        self._torch_threads = torch_threads
        self._pending = 0  # requests submitted and not finished
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference", initializer=self._init_thread)

    def _init_thread(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)

    @property
    def context_size(self) -> int:
        return self.loaded.config.block_size

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[str]:
        """Generate a reply to prompt_ids, yielding text pieces as the model produces them."""
        if self._pending >= self.max_waiting:
            raise EngineBusy(f"{self._pending} requests are already waiting")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                if stop.is_set():  # given up while it waited for the thread
                    return
                for piece in stream_text(self.loaded.model, self.loaded.tokenizer, prompt_ids, params):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                    if stop.is_set():
                        break
            except BaseException as exc:  # handed to the caller, which logs it once
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        self._pending += 1
        future = loop.run_in_executor(self._executor, work)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            self._pending -= 1
            stop.set()
            await asyncio.shield(future)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
