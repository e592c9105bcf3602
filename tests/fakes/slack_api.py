"""A fake Slack on loopback: the Web API, response_urls, file uploads and the Socket Mode socket the bot talks to,
recording every call, and Slack's side of the requests it sends the bot (signed like Slack's, or as socket envelopes).

Only what the bot uses is here, answered the way Slack documents it; anything else gets
`unknown_method`, so a new call the bot makes shows up as a failure, not a silent pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

TRIGGER_LIFETIME = 3.0  # seconds a trigger_id can open a modal
_ENTITY = re.compile(r"&(?:amp|lt|gt);")


@dataclass
class Call:
    """One thing the bot did: a Web API method with its arguments, a "response_url" post or a "socket_ack"."""

    method: str
    args: dict[str, Any]
    at: float  # time.monotonic() when it arrived
    result: dict[str, Any] = field(default_factory=dict)  # what the fake answered, e.g. a new message's ts


@dataclass
class Sent:
    """A request this fake sent the bot, as Slack would: what came back and how long it took."""

    status: int
    body: str
    seconds: float


def sign(secret: str, timestamp: str, body: str) -> str:
    """Slack's request signature: v0= and the hex HMAC-SHA256 of "v0:timestamp:body" under the signing secret."""
    digest = hmac.new(secret.encode(), f"v0:{timestamp}:{body}".encode(), hashlib.sha256).hexdigest()
    return f"v0={digest}"


def mrkdwn_texts(value: Any) -> Iterator[str]:
    """Every text Slack would read as mrkdwn in a call's arguments: message texts and mrkdwn blocks."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("text", "initial_comment") and isinstance(item, str) and value.get("type") != "plain_text":
                yield item
            else:
                yield from mrkdwn_texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from mrkdwn_texts(item)


def unescaped(text: str) -> bool:
    """Whether text holds a <, > or & that is not one of Slack's three escapes: a way to ping or link."""
    return bool(re.search(r"[<>&]", _ENTITY.sub("", text)))


class FakeSlack:
    """Slack for one test: `async with FakeSlack() as slack`, point the bot's client at `slack.api_url`."""

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-test-token",
        app_token: str = "xapp-test-token",
        signing_secret: str = "test-signing-secret",
        team: str = "T0TEST",
        bot_user: str = "UBOT",
    ) -> None:
        self.bot_token, self.app_token, self.signing_secret = bot_token, app_token, signing_secret
        self.team, self.bot_user = team, bot_user
        self.calls: list[Call] = []
        self.uploads: dict[str, bytes] = {}
        self._counter = itertools.count(1)
        self._triggers: dict[str, float] = {}
        self._views: dict[str, dict[str, Any]] = {}
        self._messages: dict[tuple[str, str], str] = {}
        self._rate_limited: list[str] = []
        self._changed = asyncio.Condition()
        self._socket: web.WebSocketResponse | None = None
        self._socket_open = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)  # Slack takes GET and POST
        app.router.add_post("/response/{id}", self._response_url)
        app.router.add_post("/upload/{file}", self._upload)
        app.router.add_get("/socket", self._socket_endpoint)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._http is not None and self._runner is not None
        if self._socket is not None:
            await self._socket.close()
        await self._http.close()
        await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    def rate_limit_next(self, method: str) -> None:
        """Answer the next call of method with 429 Too Many Requests, as Slack does over a method's rate limit."""
        self._rate_limited.append(method)

    # What the bot did

    def called(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 15.0) -> list[Call]:
        """The first `count` calls of `method`, waiting for them to arrive."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(self.called(method)) >= count), timeout)
        return self.called(method)[:count]

    def message_text(self, channel: str, ts: str) -> str:
        """A message's text as it stands now, after every chat.update."""
        return self._messages[(channel, ts)]

    def view(self, view_id: str) -> dict[str, Any]:
        """A modal or home view as it stands now, after every views.update."""
        return self._views[view_id]

    def unescaped_texts(self) -> list[str]:
        """Texts the bot sent that Slack would read as markup (a ping, a link): there should be none."""
        return [text for call in self.calls for text in mrkdwn_texts(call.args) if unescaped(text)]

    async def _record(self, method: str, args: dict[str, Any], result: dict[str, Any] | None = None) -> None:
        async with self._changed:
            self.calls.append(Call(method, args, time.monotonic(), result or {}))
            self._changed.notify_all()

    # Slack's side of requests to the bot

    async def post(
        self,
        url: str,
        body: str,
        *,
        content_type: str = "application/json",
        timestamp: int | None = None,
        secret: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Sent:
        """POST body to the bot signed as Slack signs it (with another secret or time, to test the checks)."""
        assert self._http is not None
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signed = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": stamp,
            "X-Slack-Signature": sign(self.signing_secret if secret is None else secret, stamp, body),
            **(headers or {}),
        }
        started = time.monotonic()
        async with self._http.post(url, data=body.encode(), headers=signed) as response:
            text = await response.text()
        return Sent(response.status, text, time.monotonic() - started)

    def event_body(self, event: dict[str, Any], event_id: str) -> dict[str, Any]:
        """An Events API callback, as Slack wraps an event."""
        return {
            "token": "unused",
            "team_id": self.team,
            "api_app_id": "A0TEST",
            "event": {"event_ts": event.get("ts", "1.0"), **event},
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [{"team_id": self.team, "user_id": self.bot_user, "is_bot": True}],
        }

    async def send_event(self, url: str, event: dict[str, Any], *, event_id: str, retry: int = 0, **kw: Any) -> Sent:
        """Deliver an event over HTTP; retry > 0 sends it as Slack's retry of an unacknowledged delivery."""
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"} if retry else {}
        return await self.post(url, json.dumps(self.event_body(event, event_id)), headers=headers, **kw)

    async def send_command(self, url: str, command: str, text: str, *, user: str, channel: str) -> Sent:
        """Run a slash command as `user` in `channel`; its response_url and trigger_id point at this fake."""
        n = next(self._counter)
        trigger = f"trigger-{n}"
        self._triggers[trigger] = time.monotonic()
        form = {
            "token": "unused",
            "team_id": self.team,
            "team_domain": "test",
            "channel_id": channel,
            "channel_name": "directmessage" if channel.startswith("D") else "general",
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "api_app_id": "A0TEST",
            "response_url": f"{self.url}/response/{n}",
            "trigger_id": trigger,
        }
        return await self.post(url, urlencode(form), content_type="application/x-www-form-urlencoded")

    async def send_interaction(self, url: str, payload: dict[str, Any]) -> Sent:
        """A button click or modal submission, form-encoded as payload=JSON like Slack's."""
        body = urlencode({"payload": json.dumps(payload)})
        return await self.post(url, body, content_type="application/x-www-form-urlencoded")

    def click(
        self,
        button: dict[str, Any],
        *,
        user: str,
        channel: str = "",
        response_url: str = "",
        view: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The block_actions payload of `user` clicking `button` in a message (channel) or a view (view)."""
        n = next(self._counter)
        container = {"type": "view", "view_id": view["id"]} if view else {"type": "message", "channel_id": channel}
        payload: dict[str, Any] = {
            "type": "block_actions",
            "team": {"id": self.team, "domain": "test"},
            "user": {"id": user, "username": user.lower(), "team_id": self.team},
            "api_app_id": "A0TEST",
            "trigger_id": f"trigger-{n}",
            "container": container,
            "actions": [
                {
                    "type": "button",
                    "action_id": button["action_id"],
                    "block_id": "b",
                    "value": button.get("value", ""),
                    "action_ts": str(time.time()),
                }
            ],
        }
        if view:
            payload["view"] = view
        else:
            payload["channel"] = {"id": channel}
            payload["response_url"] = response_url or f"{self.url}/response/{n}"
        return payload

    def submission(self, view: dict[str, Any], values: dict[str, str], *, user: str) -> dict[str, Any]:
        """The view_submission payload of `user` submitting `view` with `values` typed into its inputs."""
        state = {}
        for block in view["blocks"]:
            if block["type"] == "input":
                element = block["element"]
                typed = {"type": element["type"], "value": values.get(block["block_id"])}
                state[block["block_id"]] = {element["action_id"]: typed}
        return {
            "type": "view_submission",
            "team": {"id": self.team, "domain": "test"},
            "user": {"id": user, "username": user.lower(), "team_id": self.team},
            "api_app_id": "A0TEST",
            "view": {**view, "state": {"values": state}},
        }

    async def send_socket_event(self, event: dict[str, Any], *, event_id: str, retry: int = 0) -> Call:
        """Deliver an event through the Socket Mode socket; returns the bot's acknowledgement."""
        await asyncio.wait_for(self._socket_open.wait(), 15.0)
        assert self._socket is not None
        envelope_id = str(uuid.uuid4())
        await self._socket.send_str(
            json.dumps(
                {
                    "envelope_id": envelope_id,
                    "type": "events_api",
                    "accepts_response_payload": False,
                    "retry_attempt": retry,
                    "retry_reason": "timeout" if retry else "",
                    "payload": self.event_body(event, event_id),
                }
            )
        )
        def acks() -> list[Call]:
            return [c for c in self.called("socket_ack") if c.args.get("envelope_id") == envelope_id]

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(acks), 15.0)
        return acks()[0]

    # The Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            args = await request.json()
        else:
            args = dict(await request.post())
        args.update(request.query)
        for key in ("blocks", "view", "files"):  # form-encoded calls carry these as JSON text
            if isinstance(args.get(key), str):
                args[key] = json.loads(args[key])
        token = request.headers.get("Authorization", "").removeprefix("Bearer ") or args.pop("token", "")
        wanted = self.app_token if method == "apps.connections.open" else self.bot_token
        if token != wanted:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if method in self._rate_limited:
            self._rate_limited.remove(method)
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "0"})
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        result = {"ok": False, "error": "unknown_method"} if handler is None else handler(args)
        await self._record(method, args, result)
        return web.json_response(result)

    @staticmethod
    def _error(error: str) -> dict[str, Any]:
        return {"ok": False, "error": error}

    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://test.slack.com/",
            "team": "Test",
            "user": "gptbot",
            "team_id": self.team,
            "user_id": self.bot_user,
            "bot_id": "B0TEST",
        }

    def _users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = args["user"]
        profile = {"display_name": f"Person {user}", "real_name": ""}
        return {"ok": True, "user": {"id": user, "name": user.lower(), "profile": profile}}

    def _chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("text") and not args.get("blocks"):
            return self._error("no_text")
        n = next(self._counter)
        ts = f"{1_700_000_000 + n}.{n:06d}"
        self._messages[(args["channel"], ts)] = args.get("text", "")
        return {"ok": True, "channel": args["channel"], "ts": ts, "message": {"text": args.get("text", ""), "ts": ts}}

    def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        key = (args["channel"], args["ts"])
        if key not in self._messages:
            return self._error("message_not_found")
        self._messages[key] = args.get("text", "")
        return {"ok": True, "channel": args["channel"], "ts": args["ts"], "text": args.get("text", "")}

    def _chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("user"):
            return self._error("user_not_in_channel")
        return {"ok": True, "message_ts": f"{time.time():.6f}"}

    def _views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        opened = self._triggers.pop(args.get("trigger_id", ""), None)
        if opened is None or time.monotonic() - opened > TRIGGER_LIFETIME:
            return self._error("expired_trigger_id")
        view_id = f"V{next(self._counter)}"
        self._views[view_id] = {**args["view"], "id": view_id}
        return {"ok": True, "view": self._views[view_id]}

    def _views_update(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("view_id") not in self._views:
            return self._error("not_found")
        self._views[args["view_id"]] = {**args["view"], "id": args["view_id"]}
        return {"ok": True, "view": self._views[args["view_id"]]}

    def _views_publish(self, args: dict[str, Any]) -> dict[str, Any]:
        view_id = f"V{next(self._counter)}"
        self._views[view_id] = {**args["view"], "id": view_id}
        return {"ok": True, "view": self._views[view_id]}

    def _conversations_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "channel": {"id": "D" + args["users"]}}

    def _files_getUploadURLExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._counter)}"
        return {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}

    def _files_completeUploadExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        files = args["files"]
        if any(f["id"] not in self.uploads for f in files):
            return self._error("file_not_found")
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title", "")} for f in files]}

    def _apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "url": f"{self.url.replace('http://', 'ws://')}/socket"}

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploads[request.match_info["file"]] = await request.read()
        await self._record("upload", {"file": request.match_info["file"]})
        return web.Response(text="OK")

    async def _response_url(self, request: web.Request) -> web.Response:
        await self._record("response_url", {**await request.json(), "url": str(request.url)})
        return web.Response(text="ok")

    async def _socket_endpoint(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket = socket
        hello = {"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A0TEST"}}
        await socket.send_str(json.dumps(hello))
        self._socket_open.set()
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await self._record("socket_ack", json.loads(message.data))
        return socket
