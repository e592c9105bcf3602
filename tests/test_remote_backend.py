"""The remote backend against serve-model over loopback: same replies as the local engine, streaming, errors, key;
the completions API and the chat completions API of instruct models."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from bot.config import SHIPPED_MODEL, Settings, masked
from bot.messages import Incoming, Reply
from bot.sessions import SessionManager
from model.chat_template import ChatTemplate
from model.checkpoint import LoadedModel, export_gpt2, load_model, load_tokenizer, save_checkpoint
from model.completions_server import completions_app, serving
from model.engine import EngineBusy, EngineError, InferenceEngine, ReplyEngine
from model.generate import SamplingParams
from model.remote_engine import RemoteEngine, RemoteModel, choose_api
from model.tokenizer import ChatTokenizer
from fakes.llama_family import tiny_chat_model
from fakes.reciting_model import recital, reciting_model
from storage.db import make_engine, make_session_factory

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-remote-test-4711"
SCRIPT = ["Hello", " there", ",", " friend", ".", " How", " are", " you", "?"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def reciting() -> LoadedModel:
    return reciting_model(SCRIPT)


@asynccontextmanager
async def model_server(
    loaded: LoadedModel, *, max_waiting: int = 64, api_key: str | None = None
) -> AsyncIterator[tuple[str, InferenceEngine]]:
    """serve-model's app over loaded on a free loopback port: (base URL, the engine behind it)."""
    engine = InferenceEngine(loaded, max_waiting=max_waiting)
    try:
        async with serving(completions_app(engine, api_key=api_key), "127.0.0.1", 0) as url:
            yield url, engine
    finally:
        engine.close()


async def remote_for(http: aiohttp.ClientSession, url: str, **options: Any) -> RemoteEngine:
    return await RemoteEngine.connect(http, RemoteModel.from_folder(SHIPPED_MODEL, ""), base_url=url, **options)


async def text_of(pieces: AsyncIterator[str]) -> list[str]:
    async with aclosing(pieces) as stream:
        return [piece async for piece in stream]


async def post(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, str) else json.dumps(body)
    async with http.post(url + "/v1/completions", data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def make_manager(db_url: str) -> AsyncIterator[Callable[..., SessionManager]]:
    db = make_engine(db_url)
    managers: list[SessionManager] = []

    def build(engine: ReplyEngine) -> SessionManager:
        settings = Settings(
            _env_file=None, database_url=db_url, max_reply_tokens=16, temperature=0.0, rate_limit="0/minute"
        )
        managers.append(SessionManager(settings, make_session_factory(db), engine))
        return managers[-1]

    yield build
    for manager in managers:
        await manager.close()
    await db.dispose()


async def converse(manager: SessionManager, user: str, texts: list[str]) -> list[list[str]]:
    """The pieces of each reply to texts, said one after the other by user (named Ann everywhere)."""
    replies = []
    for text in texts:
        reply: Reply = await manager.handle(Incoming(platform="discord", user_id=user, display_name="Ann", text=text))
        assert reply.error is None and reply.pieces is not None
        replies.append(await text_of(reply.pieces))
    return replies


async def test_remote_backend_gives_the_local_greedy_replies_in_several_pieces(
    make_manager: Callable[..., SessionManager], shipped: LoadedModel
) -> None:
    texts = ["Hi! How was your weekend?", "I went hiking in the mountains.", "What do you like to do?"]
    local = InferenceEngine(shipped)
    try:
        expected = await converse(make_manager(local), "local-user", texts)
    finally:
        local.close()
    async with model_server(shipped) as (url, _), aiohttp.ClientSession() as http:
        remote = await remote_for(http, url)
        assert remote.loaded.name == shipped.name, "an empty model name takes the first the server lists"
        got = await converse(make_manager(remote), "remote-user", texts)
    assert ["".join(p) for p in got] == ["".join(p) for p in expected]
    assert all("".join(p).strip() for p in got)
    assert max(len(p) for p in got) > 1, "the reply streams in pieces"


async def test_completions_api_answers_as_openai_does(reciting: LoadedModel) -> None:
    prompt = reciting.tokenizer.reply_prefix()
    async with model_server(reciting) as (url, _), aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/models") as response:
            listing = await response.json()
        assert listing["data"][0]["id"] == "reciting" and listing["data"][0]["max_model_len"] == 64

        status, body = await post(http, url, {"model": "reciting", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == recital(SCRIPT, 5)
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}

        status, body = await post(http, url, {"prompt": prompt, "max_tokens": 20, "stop": [" How"], "top_k": 0})
        assert (status, body["choices"][0]["text"], body["choices"][0]["finish_reason"]) == (
            200, "Hello there, friend.", "stop"
        )
        stop_id = reciting.tokenizer.encode(" are")[0]
        status, body = await post(http, url, {"prompt": prompt, "max_tokens": 20, "stop_token_ids": [stop_id]})
        assert body["choices"][0]["text"] == "Hello there, friend. How"

        events = []
        async with http.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 6, "stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.strip():
                    events.append(line.decode().strip())
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == recital(SCRIPT, 6)
        assert len(chunks) == 7 and chunks[-1]["choices"][0]["finish_reason"] == "length"


BAD_REQUESTS = [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a JSON object"),
    ({"max_tokens": 5}, "prompt: Field required"),
    ({"prompt": 5}, "prompt: must be a string or a list of token ids"),
    ({"prompt": [[1, 2], [3]]}, "one prompt per request"),
    ({"prompt": []}, "prompt: must not be empty"),
    ({"prompt": [1, 10_000_000]}, "prompt: token ids must lie in [0, "),
    ({"prompt": "hi", "temperature": "hot"}, "temperature: Input should be a valid number"),
    ({"prompt": "hi", "temperature": 3}, "temperature: Input should be less than or equal to 2"),
    ({"prompt": "hi", "top_p": 0}, "top_p: Input should be greater than 0"),
    ({"prompt": "hi", "top_k": -2}, "top_k: Input should be greater than or equal to -1"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"prompt": "hi", "max_tokens": "10"}, "max_tokens: Input should be a valid integer"),
    ({"prompt": "hi", "stop": [""]}, "stop: must be a non-empty string or a list of them"),
    ({"prompt": "hi", "stream": "yes"}, "stream: Input should be a valid boolean"),
    ({"prompt": "hi", "n": 2}, "n: Input should be 1"),
    ({"prompt": "hi", "seed": 2**64}, "seed: Input should be less than 9223372036854775808"),
]


async def test_bad_requests_get_clear_openai_style_400s(reciting: LoadedModel) -> None:
    async with model_server(reciting) as (url, _), aiohttp.ClientSession() as http:
        for body, problem in BAD_REQUESTS:
            status, answer = await post(http, url, body)
            assert status == 400, (body, answer)
            assert problem in answer["error"]["message"], (body, answer)
            assert answer["error"]["type"] == "invalid_request_error"
        status, answer = await post(http, url, {"model": "gpt-4", "prompt": "hi"})
        assert status == 404
        assert "'gpt-4' is not served here; this server serves 'reciting'" in answer["error"]["message"]


async def test_a_full_queue_is_busy_on_both_sides(reciting: LoadedModel) -> None:
    async with model_server(reciting, max_waiting=0) as (url, _), aiohttp.ClientSession() as http:
        status, answer = await post(http, url, {"prompt": "hi"})
        assert status == 429 and "busy" in answer["error"]["message"]
        remote = await remote_for(http, url)
        with pytest.raises(EngineBusy, match="busy"):
            await text_of(remote.stream([1, 2, 3], GREEDY))


async def test_in_flight_bound_and_closing_a_stream_stops_the_generation(shipped: LoadedModel) -> None:
    long = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=4000)
    async with model_server(shipped) as (url, served), aiohttp.ClientSession() as http:
        remote = await remote_for(http, url, max_requests=1)
        prompt = shipped.tokenizer.encode("Tell me a long story.") + shipped.tokenizer.reply_prefix()
        async with aclosing(remote.stream(prompt, long)) as first:
            await anext(first)
            with pytest.raises(EngineBusy, match="1 requests are already in flight"):
                await text_of(remote.stream(prompt, GREEDY))
        for _ in range(100):  # the server sees the connection drop and cancels the request
            stats = served.stats()
            if stats.running == 0 and stats.waiting == 0:
                break
            await asyncio.sleep(0.05)
        assert (stats.running, stats.waiting) == (0, 0)
        assert stats.decoded_tokens < 1000
        assert "".join(await text_of(remote.stream(prompt, GREEDY))), "the slot is free again"


async def test_an_unreachable_server_is_reported_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(EngineError, match=rf"the inference server at {url} failed: cannot connect"):
            await remote_for(http, url, timeout=5)
        remote = RemoteEngine(http, RemoteModel.from_folder(SHIPPED_MODEL, "shipped"), base_url=url, timeout=5)
        with pytest.raises(EngineError, match="cannot connect"):
            await text_of(remote.stream([1, 2, 3], GREEDY))


async def test_api_key_goes_as_bearer_header_and_never_into_logs(
    shipped: LoadedModel, make_manager: Callable[..., SessionManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with model_server(shipped, api_key=KEY) as (url, _), aiohttp.ClientSession() as http:
        status, answer = await post(http, url, {"prompt": "hi", "max_tokens": 2})
        assert status == 401 and "API key" in answer["error"]["message"]
        status, _ = await post(http, url, {"prompt": "hi", "max_tokens": 2}, Authorization=f"Bearer {KEY}")
        assert status == 200

        with pytest.raises(EngineError, match="answered 401: missing or wrong API key") as caught:
            await remote_for(http, url, api_key="sk-wrong-key")
        assert "sk-wrong-key" not in str(caught.value)
        remote = await remote_for(http, url, api_key=KEY)
        (reply,) = await converse(make_manager(remote), "u1", ["hello"])
        assert "".join(reply).strip()
    settings = Settings(_env_file=None, model_backend="remote", remote_url=url + "/v1/", remote_api_key=KEY)
    assert settings.remote_url == url, "the OpenAI-style base with /v1 works too"
    assert masked(settings)["BOT_REMOTE_API_KEY"] == "********"
    assert KEY not in caplog.text + repr(settings) + str(masked(settings))


def test_the_tokenizer_comes_from_our_folder_or_its_gpt2_export(shipped: LoadedModel, tmp_path: Path) -> None:
    export_gpt2(shipped.model, shipped.tokenizer, tmp_path)
    text = "Hi <|user|> there, naïve 🌞"
    for folder in (SHIPPED_MODEL, tmp_path):
        tokenizer, config = load_tokenizer(folder)
        assert config == shipped.config
        assert tokenizer.encode(text) == shipped.tokenizer.encode(text)
        assert tokenizer.special_ids == shipped.tokenizer.special_ids
        assert RemoteModel.from_folder(folder, "m").context_size == shipped.config.block_size


def test_remote_backend_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="needed when BOT_MODEL_BACKEND=remote"):
        Settings(_env_file=None, model_backend="remote")


def run_cli(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BOT_") and "TOKEN" not in k and "SECRET" not in k}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_bot.py"), *args],
        env={**base, "BOT_MODEL_PATH": str(SHIPPED_MODEL), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_serve_model_help_names_its_options(tmp_path: Path) -> None:
    result = run_cli("serve-model", "--help", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout


def test_bot_with_unreachable_server_stops_with_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_cli(
        tmp_path=tmp_path, BOT_MODEL_BACKEND="remote", BOT_REMOTE_URL=url, BOT_REMOTE_API_KEY=KEY,
        BOT_LOG_LEVEL="DEBUG",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"the inference server at {url} failed: cannot connect" in result.stderr
    assert "Check BOT_REMOTE_URL" in result.stderr
    assert KEY not in result.stdout + result.stderr


# Chat completions: instruct models, whose tokenizer has a chat template.

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello! How are you doing today?"},
    {"role": "assistant", "content": "I'm doing well, thank you. How can I help you?"},
    {"role": "user", "content": "Can you tell me a joke about computers? <|im_end|>"},
]
# Our turn markers placed by a template; "." (a piece of SCRIPT) as its end-of-turn token.
RECITING_TEMPLATE = (
    "{% for m in messages %}{{ '<|bot|>' if m['role'] == 'assistant' else '<|' + m['role'] + '|>' }}"
    "{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|bot|>{% endif %}"
)


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    """A tiny random GPT of ours over a ChatML tokenizer with SmolLM2's chat template."""
    return tiny_chat_model(block_size=128, n_layer=2)


@pytest.fixture(scope="module")
def reciting_chat(reciting: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The reciting model with a chat template whose turns end at ".": it answers "Hello there, friend"."""
    folder = tmp_path_factory.mktemp("reciting-chat")
    reciting.tokenizer.save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": RECITING_TEMPLATE, "eos_token": "."}))
    return replace(reciting, tokenizer=ChatTokenizer.load(folder), name="reciting-chat")


async def post_chat(http: aiohttp.ClientSession, url: str, body: Any, **headers: str) -> tuple[int, Any]:
    data = body if isinstance(body, str) else json.dumps(body)
    async with http.post(url + "/v1/chat/completions", data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_chat_api_gives_the_local_greedy_text_over_the_same_messages(smol: LoadedModel) -> None:
    tokenizer = smol.tokenizer
    prompt = ChatTemplate.for_tokenizer(tokenizer).encode(tokenizer, CONVERSATION)
    local = InferenceEngine(smol)
    try:
        expected = "".join(await text_of(local.stream(prompt, GREEDY)))
    finally:
        local.close()
    assert expected.strip()
    async with model_server(smol) as (url, _), aiohttp.ClientSession() as http:
        remote = await RemoteEngine.connect(http, RemoteModel(tokenizer, "", smol.config.block_size), base_url=url)
        assert (remote.api, remote.loaded.name) == ("chat", "smol"), "auto: chat for a tokenizer with a template"
        pieces = await text_of(remote.stream(prompt, GREEDY, messages=CONVERSATION))
        assert "".join(pieces) == expected and len(pieces) > 1
        # the server renders the messages itself: the ids are only the bot's count of them
        assert "".join(await text_of(remote.stream([1], GREEDY, messages=CONVERSATION))) == expected
        completions = RemoteEngine(http, remote.loaded, base_url=url, api="completions")
        assert "".join(await text_of(completions.stream(prompt, GREEDY))) == expected


async def test_chat_completions_answer_as_openai_does(reciting_chat: LoadedModel) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = ChatTemplate.for_tokenizer(reciting_chat.tokenizer).encode(reciting_chat.tokenizer, messages)
    async with model_server(reciting_chat) as (url, _), aiohttp.ClientSession() as http:
        status, body = await post_chat(http, url, {"model": "reciting-chat", "messages": messages, "temperature": 0})
        assert status == 200, body
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": "Hello there, friend"}
        assert choice["finish_reason"] == "stop", "the template's end-of-turn token ends the reply"
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 4, "total_tokens": len(prompt) + 4}

        status, body = await post_chat(http, url, {"messages": messages, "max_completion_tokens": 2})
        assert (body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]) == (
            "Hello there", "length"
        )

        events = []
        async with http.post(url + "/v1/chat/completions", json={"messages": messages, "stream": True}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.strip():
                    events.append(line.decode().strip())
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
        deltas = [c["choices"][0]["delta"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert [d["content"] for d in deltas[1:-1]] == ["Hello", " there", ",", " friend"]
        assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


BAD_CHAT_REQUESTS = [
    ({}, "messages: Field required"),
    ({"messages": []}, "messages: must hold at least one message"),
    ({"messages": "hi"}, "messages: Input should be a valid list"),
    ({"messages": ["hi"]}, "messages.0: Input should be a valid dictionary"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role: Input should be 'system', 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content: Input should be a valid string"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "messages.0.content: Input should"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n: Input should be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs: log probabilities are not"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools: tools (function"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "0"}, "temperature: Input should be a valid"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens: Input should be greater"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [-1]}, "stop_token_ids: token ids must lie"),
]


async def test_bad_chat_requests_get_clear_400s_and_the_server_keeps_serving(
    reciting_chat: LoadedModel, reciting: LoadedModel
) -> None:
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with model_server(reciting_chat) as (url, _), aiohttp.ClientSession() as http:
        for body, problem in BAD_CHAT_REQUESTS:
            status, answer = await post_chat(http, url, body)
            assert status == 400, (body, answer)
            assert problem in answer["error"]["message"], (body, answer)
            assert answer["error"]["type"] == "invalid_request_error"
        status, answer = await post_chat(http, url, "{not json")
        assert status == 400 and "not valid JSON" in answer["error"]["message"]
        status, answer = await post_chat(http, url, {**hi, "model": "gpt-4"})
        assert status == 404 and "'gpt-4' is not served here" in answer["error"]["message"]
        status, answer = await post_chat(http, url, {**hi, "logprobs": False, "tools": []})
        assert (status, answer["choices"][0]["message"]["content"]) == (200, "Hello there,")
    async with model_server(reciting) as (url, _), aiohttp.ClientSession() as http:
        status, answer = await post_chat(http, url, hi)
        assert status == 400
        assert answer["error"]["message"] == (
            "the model 'reciting' has no chat template; send its prompt to /v1/completions instead"
        )
        status, _ = await post(http, url, {"prompt": "hi", "max_tokens": 2})
        assert status == 200, "completions still work"


async def test_chat_requests_share_the_busy_answer_and_the_key(reciting_chat: LoadedModel) -> None:
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    model = RemoteModel(reciting_chat.tokenizer, "", 64)
    async with model_server(reciting_chat, max_waiting=0) as (url, _), aiohttp.ClientSession() as http:
        status, answer = await post_chat(http, url, hi)
        assert status == 429 and "busy" in answer["error"]["message"]
        remote = await RemoteEngine.connect(http, model, base_url=url)
        with pytest.raises(EngineBusy, match="busy"):
            await text_of(remote.stream([1], GREEDY, messages=hi["messages"]))
    async with model_server(reciting_chat, api_key=KEY) as (url, _), aiohttp.ClientSession() as http:
        status, answer = await post_chat(http, url, hi)
        assert status == 401 and "API key" in answer["error"]["message"]
        status, _ = await post_chat(http, url, hi, Authorization=f"Bearer {KEY}")
        assert status == 200
        remote = await RemoteEngine.connect(http, model, base_url=url, api_key=KEY)
        assert "".join(await text_of(remote.stream([1], GREEDY, messages=hi["messages"]))) == "Hello there, friend"


async def test_the_chat_api_is_chosen_by_the_tokenizer_in_the_model_folder(smol: LoadedModel, tmp_path: Path) -> None:
    save_checkpoint(tmp_path, smol.model, smol.tokenizer)
    config = {"chat_template": smol.tokenizer.chat_template, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    instruct, plain = RemoteModel.from_folder(tmp_path, "smol"), RemoteModel.from_folder(SHIPPED_MODEL, "shipped")
    assert choose_api("auto", instruct.tokenizer) == "chat"
    assert choose_api("auto", plain.tokenizer) == "completions"
    assert choose_api("completions", instruct.tokenizer) == "completions"
    with pytest.raises(ValueError, match="needs a model whose tokenizer has a chat template"):
        choose_api("chat", plain.tokenizer)
    assert Settings(_env_file=None).remote_api == "auto"
    async with aiohttp.ClientSession() as http:
        remote = RemoteEngine(http, instruct, base_url="http://127.0.0.1:1")
        assert remote.api == "chat"
        with pytest.raises(ValueError, match="needs the conversation as messages"):
            await text_of(remote.stream([1, 2], GREEDY))


def test_bot_with_chat_api_and_no_chat_template_stops_with_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        tmp_path=tmp_path, BOT_MODEL_BACKEND="remote", BOT_REMOTE_URL=f"http://127.0.0.1:{free_port()}",
        BOT_REMOTE_API="chat", BOT_MODEL_PATH=str(SHIPPED_MODEL),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "BOT_REMOTE_API=chat: the chat completions API needs a model whose tokenizer has a chat template" in (
        result.stderr
    )


class FakeChatServer:
    """An OpenAI-compatible server elsewhere (llama.cpp's, Ollama) as the bot sees it: it keeps the requests
    and streams a reply the way llama.cpp's server words it (null contents, a usage chunk without choices)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/v1/chat/completions", self._chat)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "smollm2:135m", "object": "model"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def event(choices: list[dict[str, Any]]) -> bytes:
            body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "smollm2:135m", "choices": choices}
            return f"data: {json.dumps(body)}\n\n".encode()

        await response.write(event([{"index": 0, "delta": {"role": "assistant", "content": None}}]))
        for piece in self.pieces:
            await response.write(event([{"index": 0, "delta": {"content": piece}, "finish_reason": None}]))
        await response.write(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        await response.write(event([]))  # stream_options.include_usage's last chunk
        await response.write(b"data: [DONE]\n\n")
        return response


async def test_chat_api_request_and_stream_as_other_servers_speak_it(smol: LoadedModel) -> None:
    server = FakeChatServer(["Why", " did", " the", " computer", "…"])
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=20, stop_strings=("\n\n",), seed=3)
    async with serving(server.app, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        remote = await RemoteEngine.connect(http, RemoteModel(smol.tokenizer, "", 128), base_url=url + "/")
        assert "".join(await text_of(remote.stream([1], params, messages=CONVERSATION))) == "Why did the computer…"
    (sent,) = server.requests
    assert sent == {
        "model": "smollm2:135m",
        "messages": CONVERSATION,
        "max_tokens": 20,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "repetition_penalty": 1.1,
        "stop": ["\n\n"],
        "stop_token_ids": sorted(smol.tokenizer.special_ids),
        "stream": True,
        "seed": 3,
    }
