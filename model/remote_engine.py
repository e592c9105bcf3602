"""A model engine that asks an OpenAI-compatible server (vLLM, llama.cpp, Ollama, our serve-model) for replies."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import aiohttp

from model.checkpoint import load_tokenizer
from model.engine import EngineBusy, EngineError
from model.generate import SamplingParams
from model.tokenizer import ChatTokenizer

# The server's answers to "too much work": its queue is full or it is not ready yet.
BUSY_STATUSES = (429, 503)
API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

RemoteApi = Literal["completions", "chat"]


def choose_api(setting: Literal["auto", "completions", "chat"], tokenizer: ChatTokenizer) -> RemoteApi:
    """The API to ask: auto is chat for a tokenizer with a chat template, else completions.

    Chat needs the conversation as messages, which the bot has only for models with a chat
    template: a ValueError for chat without one.
    """
    if setting == "auto":
        return "chat" if tokenizer.chat_template is not None else "completions"
    if setting == "chat" and tokenizer.chat_template is None:
        raise ValueError("the chat completions API needs a model whose tokenizer has a chat template")
    return setting


@dataclass(frozen=True)
class RemoteModel:
    """What the bot needs of a model that runs elsewhere: its tokenizer (to count the prompt), its name
    on the server (sent with each request, stored with each reply) and its context size."""

    tokenizer: ChatTokenizer
    name: str
    context_size: int

    @classmethod
    def from_folder(cls, folder: Path, name: str, max_context: int | None = None) -> RemoteModel:
        """The model whose checkpoint folder or .gguf file is also here (see model.checkpoint); only its
        tokenizer and config are read, its window capped at max_context. CheckpointError when it cannot be read."""
        tokenizer, config = load_tokenizer(folder, max_context)
        return cls(tokenizer, name, config.block_size)


class RemoteEngine:
    """Streams replies from an OpenAI-compatible server: a model.engine.ReplyEngine, as InferenceEngine is.

    api (see choose_api) says how the prompt goes. completions: POST {base_url}/v1/completions
    with the prompt as token ids counted with the model's own tokenizer, so the prompt budget is
    the same as with the local engine; the server must accept a list of ids as `prompt` (vLLM and
    serve-model do). chat: POST {base_url}/v1/chat/completions with the conversation as
    messages, which the server renders with the model's chat template (vLLM, llama.cpp's server,
    Ollama and serve-model do); the prompt was counted the same way, as the bot rendered that
    template with the same tokenizer. At most max_requests requests are in flight from
    this process; more raise EngineBusy at once, as does a server that answers 429 or 503.
    timeout bounds connecting and each wait for the next piece, not the whole reply (the
    session manager bounds that). The HTTP session belongs to the caller.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        model: RemoteModel,
        *,
        base_url: str,
        api_key: str | None = None,
        api: Literal["auto", "completions", "chat"] = "auto",
        max_requests: int = 64,
        timeout: float = 30.0,
    ) -> None:
        self.loaded = model
        self.api: RemoteApi = choose_api(api, model.tokenizer)
        self.base_url = base_url.rstrip("/")
        self.max_requests = max_requests
        self._http = http
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._seconds = timeout
        self._in_flight = 0
        self._closed = False

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, model: RemoteModel, **options: Any) -> RemoteEngine:
        """An engine once the server has listed model.name (an empty name: the first model it lists)."""
        engine = cls(http, model, **options)
        served = await engine.served_models()
        if not served:
            raise EngineError(f"the inference server at {engine.base_url} lists no model")
        if not model.name:
            engine.loaded = replace(model, name=served[0])
        elif model.name not in served:
            raise EngineError(
                f"the inference server at {engine.base_url} does not serve {model.name!r}; it serves "
                + ", ".join(repr(name) for name in served)
            )
        return engine

    @property
    def context_size(self) -> int:
        return self.loaded.context_size

    @property
    def running(self) -> bool:
        """Whether it takes requests (for /readyz): not closed."""
        return not self._closed

    @property
    def waiting(self) -> int:
        """Requests in flight to the server, whose own queue this process cannot see (for /metrics)."""
        return self._in_flight

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cache_key: str | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> AsyncIterator[str]:
        """Yield the reply's text pieces as the server streams them; closing this cancels the request.

        Any special token, a stop id or a stop string ends the reply, as with the local engine.
        The chat API sends messages (then required) instead of prompt_ids. cache_key is not
        sent: servers such as vLLM reuse a shared prompt prefix by themselves.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if self.api == "chat" and messages is None:
            raise ValueError("the chat completions API needs the conversation as messages")
        if self._closed:
            raise EngineError("the remote engine is closed")
        if self._in_flight >= self.max_requests:
            raise EngineBusy(f"{self._in_flight} requests are already in flight to {self.base_url}")
        if params.max_new_tokens == 0:
            return
        self._in_flight += 1
        try:
            async with self._http.post(
                self.base_url + API_PATHS[self.api],
                json=self._body(prompt_ids, messages, params),
                headers=self._headers,
                timeout=self._timeout,
            ) as response:
                await _raise_for_status(response, self.base_url)
                try:
                    async for piece in _sse_texts(response, self.api):
                        yield piece
                finally:
                    # Drops the connection, so a server stops generating for a reply nobody reads any more.
                    response.close()
        except TimeoutError as exc:
            raise EngineError(f"the inference server at {self.base_url} sent nothing for {self._seconds:g} s") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"the inference server at {self.base_url} failed: {_reason(exc)}") from exc
        finally:
            self._in_flight -= 1

    async def served_models(self) -> list[str]:
        """The names GET {base_url}/v1/models lists, to check the server and pick a model."""
        try:
            async with self._http.get(
                self.base_url + "/v1/models", headers=self._headers, timeout=self._timeout
            ) as response:
                await _raise_for_status(response, self.base_url)
                listing = await response.json(content_type=None)
        except TimeoutError as exc:
            raise EngineError(f"the inference server at {self.base_url} sent nothing for {self._seconds:g} s") from exc
        except aiohttp.ClientError as exc:
            raise EngineError(f"the inference server at {self.base_url} failed: {_reason(exc)}") from exc
        except ValueError as exc:
            raise EngineError(f"{self.base_url}/v1/models did not answer JSON") from exc
        try:
            return [str(entry["id"]) for entry in listing["data"]]
        except (KeyError, TypeError) as exc:
            raise EngineError(f"{self.base_url}/v1/models did not answer a model list") from exc

    def close(self) -> None:
        """Refuse new requests; those in flight end when their HTTP session closes. Safe to call twice."""
        self._closed = True

    def _body(
        self, prompt_ids: list[int], messages: Sequence[Mapping[str, str]] | None, params: SamplingParams
    ) -> dict[str, Any]:
        special = sorted(self.loaded.tokenizer.special_ids)
        if self.api == "chat":
            assert messages is not None  # stream checks
            prompt: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
        else:
            prompt = {"prompt": list(prompt_ids)}
        body: dict[str, Any] = {
            "model": self.loaded.name,
            **prompt,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # vLLM's extra sampling fields; -1 is "off" for top_k in every vLLM version
            "top_k": params.top_k or -1,
            "repetition_penalty": params.repetition_penalty,
            "stop": list(params.stop_strings),
            "stop_token_ids": sorted({*params.stop_ids, *special}),
            "stream": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        return body


async def _raise_for_status(response: aiohttp.ClientResponse, base_url: str) -> None:
    """EngineBusy for 429/503, EngineError with the server's own message for any other non-200."""
    if response.status == 200:
        return
    text = (await response.content.read(4096)).decode("utf-8", errors="replace")
    message = _error_message(text) or response.reason or "no reason given"
    if response.status in BUSY_STATUSES:
        raise EngineBusy(f"the inference server at {base_url} is busy ({response.status}): {message}")
    raise EngineError(f"the inference server at {base_url} answered {response.status}: {message}")


def _error_message(text: str) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or vLLM's {"message": ...})."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if body.get("message"):
            return str(body["message"])
    return text.strip()[:300]


def _completion_text(event: Any) -> Any:
    return event["choices"][0]["text"]


def _chat_text(event: Any) -> Any:
    # a role-only first chunk or the finish_reason chunk has no content; a usage-only one no choices
    choices = event["choices"]
    return (choices[0].get("delta") or {}).get("content") if choices else None


# per API: where an event holds the text, and the same said for an error message
EVENT_TEXTS: dict[RemoteApi, tuple[Callable[[Any], Any], str]] = {
    "completions": (_completion_text, "choices[0].text"),
    "chat": (_chat_text, "choices[0].delta"),
}


async def _sse_texts(response: aiohttp.ClientResponse, api: RemoteApi) -> AsyncIterator[str]:
    """The non-empty texts of a (chat) completions event stream, until data: [DONE]."""
    text_of, where = EVENT_TEXTS[api]
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise EngineError(f"the inference server sent an event that is not JSON: {data[:200]!r}") from exc
        if "error" in event or event.get("object") == "error":
            raise EngineError(f"the inference server failed while answering: {_error_message(data)}")
        try:
            text = text_of(event)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise EngineError(f"the inference server sent an event without {where}: {data[:200]!r}") from exc
        if text is not None and not isinstance(text, str):
            raise EngineError(f"the inference server sent an event whose text is not a string: {data[:200]!r}")
        if text:
            yield text
    raise EngineError("the inference server ended the stream before data: [DONE]")


def _reason(exc: aiohttp.ClientError) -> str:
    """A short cause: the OS's words for a refused or unreachable connection, else the error itself."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect ({exc.os_error.strerror or exc.os_error})"
    return str(exc) or type(exc).__name__
