"""POST /v1/chat/completions on serve-model: messages rendered with the served model's chat template."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.chat_template import ChatTemplate, ChatTemplateError
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

# The served model's template, or why there is none, in words for the 400 a chat request then gets.
TEMPLATE_KEY: web.AppKey[ChatTemplate | str] = web.AppKey("chat_template")


class Message(BaseModel):
    """One message of the conversation; other fields (name) are ignored, other roles (tool) refused."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """The fields of POST /v1/chat/completions we honour, besides the sampling ones both APIs share.

    max_completion_tokens is OpenAI's newer name for max_tokens; without either the reply may
    fill what the prompt leaves of the context, as with vLLM. Tools and log probabilities are refused.
    """

    messages: list[Message]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value: list[Message]) -> list[Message]:
        if not value:
            raise ValueError("must hold at least one message")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("log probabilities are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools (function calling) are not supported")
        return value

    def reply_limit(self, prompt_tokens: int, context_size: int) -> int:
        """The most tokens the reply may have."""
        asked = self.max_completion_tokens or self.max_tokens
        return asked or max(1, min(MAX_TOKENS, context_size - prompt_tokens))


@dataclass(frozen=True)
class ChatShape:
    """A chat completion's answer as OpenAI words it: chat.completion(.chunk) objects, text in deltas."""

    id: str
    created: int
    model: str

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def end(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk({}, finish_reason)

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage}

    def _chunk(self, delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def add_chat_completions(app: web.Application) -> None:
    """Answer POST /v1/chat/completions on app, whose engine is already set (ENGINE_KEY)."""
    app[TEMPLATE_KEY] = _template(app)
    app.router.add_post("/v1/chat/completions", _chat_completions)


def _template(app: web.Application) -> ChatTemplate | str:
    """The served model's chat template, compiled once; else the reason chat requests are refused."""
    tokenizer, name = app[ENGINE_KEY].loaded.tokenizer, app[NAME_KEY]
    if tokenizer.chat_template is None:
        return f"the model {name!r} has no chat template; send its prompt to /v1/completions instead"
    try:
        return ChatTemplate.for_tokenizer(tokenizer)
    except ChatTemplateError as exc:
        log.warning("chat completions are off: the chat template of %s does not load: %s", name, exc)
        return f"the chat template of the model {name!r} does not load: {exc}"


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    engine, name, template = request.app[ENGINE_KEY], request.app[NAME_KEY], request.app[TEMPLATE_KEY]
    body = await parse_body(request, ChatCompletionRequest)
    check_model(body, name)
    if isinstance(template, str):
        raise RequestError(400, template, param="messages")
    check_token_ids(engine, "stop_token_ids", body.stop_token_ids)
    messages = [message.model_dump() for message in body.messages]
    try:
        # the template's own markers become special tokens; the contents stay plain text
        prompt = await asyncio.to_thread(template.encode, engine.loaded.tokenizer, messages)
    except ChatTemplateError as exc:  # such as a template that wants roles to alternate
        raise RequestError(400, f"messages: {exc}", param="messages") from exc
    if not prompt:
        raise RequestError(400, "messages: the chat template made an empty prompt of them", param="messages")
    params = body.sampling(body.reply_limit(len(prompt), engine.context_size))
    shape = ChatShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), name)
    return await answer(request, prompt, params, stream=body.stream, shape=shape)
