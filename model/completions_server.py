"""Our inference engine behind an OpenAI-compatible API (completions and chat), so several bots can share it."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import Field, field_validator

from model.chat_completions import add_chat_completions
from model.engine import InferenceEngine
from model.openai_wire import (
    ENGINE_KEY,
    MAX_TOKENS,
    NAME_KEY,
    RequestError,
    SamplingFields,
    answer,
    check_model,
    check_token_ids,
    parse_body,
)

log = logging.getLogger(__name__)


class CompletionRequest(SamplingFields):
    """The fields of POST /v1/completions we honour, besides the sampling ones both APIs share.

    echo and logprobs, which would change the answer in ways we cannot, are refused.
    """

    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    echo: Literal[False] = False
    logprobs: None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(type(i) is int for i in value)):
            if not value:
                raise ValueError("must not be empty")
            return value
        raise ValueError("must be a string or a list of token ids (one prompt per request)")


@dataclass(frozen=True)
class CompletionShape:
    """A completion's answer as OpenAI words it: text_completion objects, the text in choices[0].text."""

    id: str
    created: int
    model: str

    def opening(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def end(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk("", finish_reason)

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._chunk(text, finish_reason), "usage": usage}

    def _chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": [choice]
        }


def completions_app(engine: InferenceEngine, *, api_key: str | None = None) -> web.Application:
    """The web app: POST /v1/completions, POST /v1/chat/completions (models with a chat template) and
    GET /v1/models, with a Bearer key required when api_key is set."""
    app = web.Application(middlewares=[_errors, *([_bearer(api_key)] if api_key else [])])
    app[ENGINE_KEY] = engine
    app[NAME_KEY] = engine.loaded.name
    app.router.add_post("/v1/completions", _completions)
    add_chat_completions(app)
    app.router.add_get("/v1/models", _models)
    return app


@asynccontextmanager
async def serving(app: web.Application, host: str, port: int) -> AsyncIterator[str]:
    """Listen on host:port (port 0: any free one) until the block ends; yields the base URL."""
    # handler_cancellation: a client that hangs up stops its generation at once, not at the next write
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    finally:
        await runner.cleanup()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RequestError as exc:
        if exc.status >= 500:
            log.warning("%s %s failed: %s", request.method, request.path, exc)
        return exc.response()


def _bearer(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise RequestError(
                401, "missing or wrong API key (send it as Authorization: Bearer KEY)", "authentication_error"
            )
        return await handler(request)

    return check


async def _models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    model = {
        "id": request.app[NAME_KEY],
        "object": "model",
        "created": int(time.time()),
        "owned_by": "gptbot",
        "max_model_len": engine.context_size,
    }
    return web.json_response({"object": "list", "data": [model]})


async def _completions(request: web.Request) -> web.StreamResponse:
    engine, name = request.app[ENGINE_KEY], request.app[NAME_KEY]
    body = await parse_body(request, CompletionRequest)
    check_model(body, name)
    prompt = await _prompt_ids(engine, body)
    shape = CompletionShape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), name)
    return await answer(request, prompt, body.sampling(body.max_tokens), stream=body.stream, shape=shape)


async def _prompt_ids(engine: InferenceEngine, body: CompletionRequest) -> list[int]:
    """The prompt as token ids; text is encoded as plain text (marker-looking text stays text)."""
    check_token_ids(engine, "prompt", body.prompt if isinstance(body.prompt, list) else [])
    check_token_ids(engine, "stop_token_ids", body.stop_token_ids)
    if isinstance(body.prompt, str):
        return await asyncio.to_thread(engine.loaded.tokenizer.encode, body.prompt)
    return body.prompt
