"""Readiness: whether the bot can do its work now (database, model, platform connections), for /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.messages import Adapter


class ModelEngine(Protocol):
    """What readiness needs of an engine, local (model.engine) or remote (model.remote_engine)."""

    @property
    def running(self) -> bool: ...


class Readiness:
    """Checks the parts a message needs; each problem is one line that says which part and why.

    A load balancer or orchestrator stops sending work while any is reported, and the
    admin reads the same lines in the /readyz response.
    """

    def __init__(
        self, db: AsyncEngine, engine: ModelEngine, adapters: Sequence[Adapter], *, timeout: float = 5.0
    ) -> None:
        self.db = db
        self.engine = engine
        self.adapters = list(adapters)
        self.timeout = timeout

    async def problems(self) -> list[str]:
        """Nothing when ready; else one line per part that is not."""
        problems = []
        database = await self._database_problem()
        if database:
            problems.append(f"database: {database}")
        if not self.engine.running:
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
