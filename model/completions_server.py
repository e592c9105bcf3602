"""Our inference engine behind an OpenAI-compatible completions API, so several bot processes can share it."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from model.engine import EngineBusy, EngineError, InferenceEngine
from model.generate import SamplingParams
from model.reply_text import ReplyText

log = logging.getLogger(__name__)

MAX_TOKENS = 4096  # as BOT_MAX_REPLY_TOKENS: one request must not hold a batch row for ever
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

ENGINE_KEY = web.AppKey("engine", InferenceEngine)
NAME_KEY = web.AppKey("model_name", str)


class CompletionRequest(BaseModel):
    """The fields of POST /v1/completions we honour; the vLLM extras top_k, repetition_penalty, stop_token_ids.

    Strict: "0.5" is not a number here, as with OpenAI. Fields we do not know are ignored;
    those that would change the answer in ways we cannot (n, echo, logprobs) are refused.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: off
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    stream: bool = False
    n: Literal[1] = 1
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

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        strings = [value] if isinstance(value, str) else value
        if strings is not None and not (isinstance(strings, list) and all(isinstance(s, str) and s for s in strings)):
            raise ValueError("must be a non-empty string or a list of them")
        return value

    def sampling(self) -> SamplingParams:
        """Our SamplingParams for this request."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_tokens,
            stop_ids=tuple(self.stop_token_ids),
            stop_strings=tuple(stop),
            seed=self.seed,
        )


class RequestError(Exception):
    """A request we answer with an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def response(self) -> web.Response:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": None}
        return web.json_response({"error": error}, status=self.status)


@dataclass
class _Progress:
    """What a running completion has done so far, for finish_reason and usage."""

    tokens: int = 0
    finish_reason: str = "length"


def completions_app(engine: InferenceEngine, *, api_key: str | None = None) -> web.Application:
    """The web app: POST /v1/completions and GET /v1/models, with a Bearer key required when api_key is set."""
    app = web.Application(middlewares=[_errors, *([_bearer(api_key)] if api_key else [])])
    app[ENGINE_KEY] = engine
    app[NAME_KEY] = engine.loaded.name
    app.router.add_post("/v1/completions", _completions)
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
    body = await _parse(request)
    if body.model is not None and body.model != name:
        raise RequestError(
            404, f"the model {body.model!r} is not served here; this server serves {name!r}", param="model"
        )
    prompt = await _prompt_ids(engine, body)
    params = body.sampling()
    progress = _Progress()
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": completion_id, "object": "text_completion", "created": created, "model": name, "choices": [choice]
        }

    async with aclosing(_pieces(engine, prompt, params, progress)) as pieces:
        try:
            first = await anext(pieces, None)
        except EngineBusy as exc:
            raise RequestError(429, f"the server is busy: {exc}; try again shortly", "rate_limit_error") from exc
        except EngineError as exc:
            raise RequestError(503, str(exc), "server_error") from exc
        if not body.stream:
            text = [first or ""]
            try:
                text += [piece async for piece in pieces]
            except EngineError as exc:
                raise RequestError(500, str(exc), "server_error") from exc
            usage = {
                "prompt_tokens": len(prompt),
                "completion_tokens": progress.tokens,
                "total_tokens": len(prompt) + progress.tokens,
            }
            return web.json_response({**chunk("".join(text), progress.finish_reason), "usage": usage})
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            if first is not None:
                await _send(response, chunk(first, None))
            async for piece in pieces:
                await _send(response, chunk(piece, None))
            await _send(response, chunk("", progress.finish_reason))
        except EngineError as exc:
            log.warning("completion %s failed: %s", completion_id, exc)
            await _send(response, {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        except ConnectionResetError:  # the client hung up: closing pieces stops the generation
            return response
        await response.write(b"data: [DONE]\n\n")
        return response


async def _parse(request: web.Request) -> CompletionRequest:
    try:
        raw = await request.json()
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise RequestError(400, problems, param=field or None) from exc


async def _prompt_ids(engine: InferenceEngine, body: CompletionRequest) -> list[int]:
    """The prompt as token ids; text is encoded as plain text (marker-looking text stays text)."""
    vocab = engine.loaded.config.vocab_size
    ids = body.prompt if isinstance(body.prompt, list) else []
    for field, checked in (("prompt", ids), ("stop_token_ids", body.stop_token_ids)):
        if not all(0 <= i < vocab for i in checked):
            raise RequestError(400, f"{field}: token ids must lie in [0, {vocab})", param=field)
    if isinstance(body.prompt, str):
        return await asyncio.to_thread(engine.loaded.tokenizer.encode, body.prompt)
    return body.prompt


async def _pieces(
    engine: InferenceEngine, prompt: list[int], params: SamplingParams, progress: _Progress
) -> AsyncIterator[str]:
    """The reply's text as engine.stream gives it, while counting tokens and telling why it ended."""
    tokenizer = engine.loaded.tokenizer
    params = replace(params, stop_ids=(*params.stop_ids, *sorted(tokenizer.special_ids)))
    text = ReplyText(tokenizer, params.stop_strings)
    async with aclosing(engine.stream_tokens(prompt, params)) as tokens:
        async for token in tokens:
            progress.tokens += 1
            if piece := text.push(token):
                yield piece
            if text.stopped:
                progress.finish_reason = "stop"
                return
    if progress.tokens < params.max_new_tokens:
        progress.finish_reason = "stop"  # a stop id, a special token
    if rest := text.finish():
        yield rest


async def _send(response: web.StreamResponse, event: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(event)}\n\n".encode())
