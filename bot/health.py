"""Readiness: whether the bot can do its work now (not shutting down; database, model, platforms), for /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.messages import Adapter
from bot.sessions import SessionManager


class Readiness:
    """Checks the parts a message needs; each problem is one line that says which part and why.

    A load balancer or orchestrator stops sending work while any is reported, and the
    admin reads the same lines in the /readyz response. A core that is shutting down is
    not ready either, so traffic moves to other processes during the shutdown grace.
    """

    def __init__(
        self, db: AsyncEngine, manager: SessionManager, adapters: Sequence[Adapter], *, timeout: float = 5.0
    ) -> None:
        self.db = db
        self.manager = manager
        self.adapters = list(adapters)
        self.timeout = timeout

    async def problems(self) -> list[str]:
        """Nothing when ready; else one line per part that is not."""
        problems = ["shutting down"] if self.manager.closing else []
        database = await self._database_problem()
        if database:
            problems.append(f"database: {database}")
        if not self.manager.engine.running:
            problems.append("model: the inference engine is not running")
        for adapter in self.adapters:
            if not await adapter.connected():
                problems.append(f"{adapter.name}: not connected")
        return problems

    async def _database_problem(self) -> str:
        try:
            async with asyncio.timeout(self.timeout), self.db.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except Exception as exc:  # whatever the driver raises, the reason goes into the response
            reason = str(getattr(exc, "orig", None) or exc).splitlines()
            return reason[0] if reason else type(exc).__name__
        return ""
