"""What /v1/completions and /v1/chat/completions share: sampling fields, error bodies, the streamed answer."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

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


class SamplingFields(BaseModel):
    """The request fields both APIs honour; the vLLM extras top_k, repetition_penalty, stop_token_ids.

    Strict: "0.5" is not a number here, as with OpenAI. Fields we do not know are ignored;
    those that would change the answer in ways we cannot (n > 1) are refused.
    """

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: off
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = []
    stream: bool = False
    n: Literal[1] = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        strings = [value] if isinstance(value, str) else value
        if strings is not None and not (isinstance(strings, list) and all(isinstance(s, str) and s for s in strings)):
            raise ValueError("must be a non-empty string or a list of them")
        return value

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """Our SamplingParams for this request, with its token limit as the API words it."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=max_new_tokens,
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


Body = TypeVar("Body", bound=SamplingFields)


async def parse_body(request: web.Request, schema: type[Body]) -> Body:
    """The request's JSON body as schema; a 400 naming every bad field otherwise."""
    try:
        raw = await request.json()
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise RequestError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()
        )
        raise RequestError(400, problems, param=field or None) from exc


def check_model(body: SamplingFields, served: str) -> None:
    """A 404 when the request names a model other than the one served here (no name: that one)."""
    if body.model is not None and body.model != served:
        raise RequestError(
            404, f"the model {body.model!r} is not served here; this server serves {served!r}", param="model"
        )


def check_token_ids(engine: InferenceEngine, field: str, ids: Sequence[int]) -> None:
    """A 400 when a token id of the request lies outside the model's vocabulary."""
    vocab = engine.loaded.config.vocab_size
    if not all(0 <= i < vocab for i in ids):
        raise RequestError(400, f"{field}: token ids must lie in [0, {vocab})", param=field)


class AnswerShape(Protocol):
    """How one API words an answer: its streamed events and its whole (non-streaming) body."""

    id: str

    def opening(self) -> list[dict[str, Any]]:
        """The events sent before the first piece of text."""
        ...

    def piece(self, text: str) -> dict[str, Any]: ...

    def end(self, finish_reason: str) -> dict[str, Any]:
        """The last event before data: [DONE]."""
        ...

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]: ...


@dataclass
class _Progress:
    """What a running completion has done so far, for finish_reason and usage."""

    tokens: int = 0
    finish_reason: str = "length"


async def answer(
    request: web.Request, prompt: list[int], params: SamplingParams, *, stream: bool, shape: AnswerShape
) -> web.StreamResponse:
    """Run prompt on the app's engine and answer as shape words it: server-sent events, or one JSON body.

    A full queue is a 429 and an engine that cannot start a 503, both before any event; a
    failure after the first event is an error event, as vLLM sends.
    """
    engine = request.app[ENGINE_KEY]
    progress = _Progress()
    async with aclosing(_pieces(engine, prompt, params, progress)) as pieces:
        try:
            first = await anext(pieces, None)
        except EngineBusy as exc:
            raise RequestError(429, f"the server is busy: {exc}; try again shortly", "rate_limit_error") from exc
        except EngineError as exc:
            raise RequestError(503, str(exc), "server_error") from exc
        if not stream:
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
            return web.json_response(shape.whole("".join(text), progress.finish_reason, usage))
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            for event in shape.opening():
                await _send(response, event)
            if first is not None:
                await _send(response, shape.piece(first))
            async for piece in pieces:
                await _send(response, shape.piece(piece))
            await _send(response, shape.end(progress.finish_reason))
        except EngineError as exc:
            log.warning("completion %s failed: %s", shape.id, exc)
            await _send(response, {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        except ConnectionResetError:  # the client hung up: closing pieces stops the generation
            return response
        await response.write(b"data: [DONE]\n\n")
        return response


async def _pieces(
    engine: InferenceEngine, prompt: list[int], params: SamplingParams, progress: _Progress
) -> AsyncIterator[str]:
    """The reply's text as engine.stream gives it, while counting tokens and telling why it ended."""
    tokenizer = engine.loaded.tokenizer
    # special ids include a chat template's end-of-turn token: an instruct model's reply ends there
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
