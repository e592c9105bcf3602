"""The bot's lifetime: run the adapters until their input ends or SIGTERM/SIGINT comes, then shut down in order."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence

from bot.messages import Adapter
from bot.sessions import SessionManager

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def run_adapters(adapters: Sequence[Adapter], manager: SessionManager, *, grace: float) -> None:
    """Run every adapter until all have ended or a stop signal arrives, then shut down gracefully.

    The core stops first: new messages are answered "shutting down", replies in progress get
    `grace` seconds and the rest are cancelled and recorded as cancelled. Only then are the
    adapters cancelled, which closes their platform connections, so the last pieces of the
    replies still go out. An adapter that fails (a bad token, say) ends the others; its error is raised.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    running = [asyncio.create_task(adapter.run(), name=f"adapter {adapter.name}") for adapter in adapters]
    stopping = asyncio.create_task(stop.wait())
    try:
        await _until_stopped_or_ended(running, stopping)
    finally:
        stopping.cancel()
        await manager.shutdown(grace)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if not stop.is_set():
        log.warning("%s: shutting down", sig.name)
    stop.set()


async def _until_stopped_or_ended(running: list[asyncio.Task[None]], stopping: asyncio.Task[bool]) -> None:
    """Return when stopping ends or every adapter has; raise the first adapter's error."""
    pending = set(running)
    while pending:
        done, pending = await asyncio.wait(pending | {stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping in done:
            return
        pending.discard(stopping)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error
