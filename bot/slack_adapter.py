"""The Slack adapter: mentions, DMs, the slash command, buttons, a settings modal and App Home; HTTP or Socket Mode."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import HttpRequest, HttpResponse, RetryState
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot.config import Settings
from bot.http_server import HttpServer, HttpServerError
from bot.messages import ErrorKind, Incoming, Reply
from bot.metrics import Metrics
from bot.sessions import SessionManager
from bot.slack_format import escape, from_slack, split_message
from bot.slack_stream import EMPTY_REPLY, NO_PINGS, NO_PREVIEWS, MessageStream, UpdateBudget
from bot.slack_views import (
    CONFIRM_ACTION,
    HOME_RESET_ACTION,
    SETTINGS_CALLBACK,
    confirm_blocks,
    home_view,
    settings_commands,
    settings_modal,
)

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
ACK_DEADLINE = 2.5  # seconds; Slack shows an error when an interaction is not acknowledged within 3
SHUTDOWN_GRACE = 30.0  # seconds that answers in progress get to finish when the bot stops
REMEMBERED = 10_000  # threads the bot talks in, and display names, kept in memory
FAILURE_TEXT = "Sorry, something went wrong on my side. Please try again."


class SlackSetupError(Exception):
    """A Slack setting the admin must fix: a token, the signing secret, the HTTP address."""


class CountedRateLimitRetryHandler(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's wait-and-retry on 429, counting every 429 Slack sends for /metrics."""

    def __init__(self, metrics: Metrics, *, max_retry_count: int) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.metrics = metrics

    async def can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is not None and response.status_code == 429:
            self.metrics.rate_limit_hit("slack")
        return await super().can_retry_async(state=state, request=request, response=response, error=error)


def slack_client(settings: Settings, metrics: Metrics | None = None) -> AsyncWebClient:
    """The Web API client for SLACK_BOT_TOKEN at SLACK_API_URL; it waits and retries when Slack rate-limits it.

    With metrics, each 429 is counted as bot_platform_rate_limited_total{platform="slack"}.
    """
    if settings.slack_bot_token is None:
        raise SlackSetupError("the Slack adapter needs SLACK_BOT_TOKEN (the app's Bot User OAuth Token, xoxb-...)")
    base = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    rate_limits = (
        AsyncRateLimitErrorRetryHandler(max_retry_count=2)
        if metrics is None
        else CountedRateLimitRetryHandler(metrics, max_retry_count=2)
    )
    return AsyncWebClient(
        token=settings.slack_bot_token.get_secret_value(),
        retry_handlers=[AsyncConnectionErrorRetryHandler(), rate_limits],
        **base,
    )


@dataclass(frozen=True)
class Place:
    """Where an answer goes: a channel or DM, perhaps a thread; for slash commands and buttons, their response_url."""

    workspace: str
    channel: str
    user: str
    is_dm: bool
    thread_ts: str = ""
    response_url: str = ""
    replace_original: bool = False  # a button's answer takes the place of the message with the button


class SlackAdapter:
    """Translates Slack's events and interactions into Incoming messages and shows the core's Replies in Slack.

    Socket Mode when SLACK_APP_TOKEN is set, else HTTP on BOT_HTTP_HOST:BOT_HTTP_PORT at
    /slack/events with every request's signature checked against SLACK_SIGNING_SECRET:
    mounted on the bot's shared server when one is handed in, else on a server of its own.
    """

    name = "slack"

    def __init__(
        self,
        manager: SessionManager,
        settings: Settings,
        client: AsyncWebClient,
        *,
        update_interval: float = 1.0,
        update_budget: UpdateBudget | None = None,
        message_limit: int = 3000,
        http: HttpServer | None = None,
    ) -> None:
        if settings.slack_app_token is None and settings.slack_signing_secret is None:
            raise SlackSetupError("Slack needs SLACK_SIGNING_SECRET (HTTP mode) or SLACK_APP_TOKEN (Socket Mode)")
        if settings.slack_app_token is None and http is None and settings.http_port == 0:
            raise SlackSetupError(
                "Slack's HTTP mode needs the HTTP server, but BOT_HTTP_PORT=0; "
                "set a port, or SLACK_APP_TOKEN for Socket Mode"
            )
        self.manager = manager
        self.settings = settings
        self.client = client
        self.update_interval = update_interval
        self.update_budget = update_budget or UpdateBudget()
        self.message_limit = message_limit
        secret = settings.slack_signing_secret
        self.app = AsyncApp(
            client=client, signing_secret=secret.get_secret_value() if secret else "", name="gptbot"
        )
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)
        self.app.event("app_home_opened")(self._on_home_opened)
        self.app.command(settings.slack_command)(self._on_command)
        self.app.action(CONFIRM_ACTION)(self._on_confirm)
        self.app.action(HOME_RESET_ACTION)(self._on_home_reset)
        self.app.view(SETTINGS_CALLBACK)(self._on_settings_submit)
        self._threads: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._names: OrderedDict[str, str] = OrderedDict()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._socket: AsyncSocketModeHandler | None = None
        self._http = http
        self._own_http: HttpServer | None = None
        self._started = False
        if http is not None and settings.slack_app_token is None:
            http.add_route("POST", EVENTS_PATH, self._on_http)

    async def run(self) -> None:
        """Serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def start(self) -> None:
        """Check the tokens, then connect the socket or open the HTTP endpoint; SlackSetupError says what to fix."""
        me = await self._checked("SLACK_BOT_TOKEN", self.client.auth_test())
        if self.settings.slack_app_token is not None:
            app_token = self.settings.slack_app_token.get_secret_value()
            # The socket client retries a refused token forever; asking once first turns that into an error.
            await self._checked("SLACK_APP_TOKEN", self.client.apps_connections_open(app_token=app_token))
            self._socket = AsyncSocketModeHandler(self.app, app_token)
            await self._socket.connect_async()
            where = "connected over Socket Mode"
        else:
            server = self._http or await self._open_own_server()
            where = f"listening on {server.url}{EVENTS_PATH}"
        self._started = True
        log.info("Slack: signed in as @%s in %s (%s); %s", me.get("user"), me.get("team"), me.get("team_id"), where)

    async def _open_own_server(self) -> HttpServer:
        """A server for /slack/events alone, for an adapter started without the bot's shared one."""
        server = HttpServer(self.settings.http_host, self.settings.http_port)
        server.add_route("POST", EVENTS_PATH, self._on_http)
        try:
            await server.start()
        except HttpServerError as exc:
            raise SlackSetupError(str(exc)) from exc
        self._own_http = server
        return server

    async def connected(self) -> bool:
        """Socket Mode: the socket is open and answers pings; HTTP mode: signed in and receiving."""
        if self._socket is not None:
            return await self._socket.client.is_connected()
        return self._started

    @staticmethod
    async def _checked(setting: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except SlackApiError as exc:
            raise SlackSetupError(f"Slack refused {setting}: {exc.response.get('error', exc)}") from exc

    async def stop(self) -> None:
        """Stop taking requests, then give answers in progress time to finish."""
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        self._started = False
        if self._own_http is not None:
            await self._own_http.stop()
            self._own_http = None
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=SHUTDOWN_GRACE)

    async def _on_http(self, request: web.Request) -> web.Response:
        return await to_aiohttp_response(await self.app.async_dispatch(await to_bolt_request(request)))

    # Events

    async def _on_mention(self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext) -> None:
        if event["channel"].startswith("D") or "user" not in event:  # DMs arrive as message.im
            return
        thread = event.get("thread_ts") or event["ts"]
        place = Place(body["team_id"], event["channel"], event["user"], is_dm=False, thread_ts=thread)
        text = from_slack(event.get("text", ""), context.bot_user_id or "")
        await self._guarded(place, self._converse(place, text, event_id=body["event_id"]))

    async def _on_message(self, event: dict[str, Any], body: dict[str, Any], context: AsyncBoltContext) -> None:
        if event.get("subtype") or event.get("bot_id") or "user" not in event:  # edits, joins, other bots
            return
        text, thread = event.get("text", ""), event.get("thread_ts", "")
        if event.get("channel_type") == "im":
            place = Place(body["team_id"], event["channel"], event["user"], is_dm=True, thread_ts=thread)
        elif (body["team_id"], event["channel"], thread) in self._threads and f"<@{context.bot_user_id}>" not in text:
            # A reply in a thread the bot talks in; a mention there comes as app_mention too.
            place = Place(body["team_id"], event["channel"], event["user"], is_dm=False, thread_ts=thread)
        else:
            return
        plain = from_slack(text, context.bot_user_id or "")
        await self._guarded(place, self._converse(place, plain, event_id=body["event_id"]))

    async def _on_home_opened(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        if event.get("tab") != "home":
            return
        place = Place(body["team_id"], event.get("channel", ""), event["user"], is_dm=True)
        await self._guarded(None, self._publish_home(place))

    # Interactions: acknowledged at once, answered afterwards

    async def _on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack()
        channel = command["channel_id"]
        place = Place(
            command["team_id"],
            channel,
            command["user_id"],
            is_dm=channel.startswith("D"),
            response_url=command["response_url"],
        )
        text = from_slack(command.get("text", ""))
        if text.lower() == "settings":
            await self._guarded(place, self._open_settings(place, command["trigger_id"]))
        else:
            # `/gpt reset` is the core's /reset; `/gpt` alone asks for help.
            await self._guarded(place, self._converse(place, "/" + (text.lstrip("/") or "help")))

    async def _on_confirm(self, ack: AsyncAck, body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        channel = body.get("channel", {}).get("id", "")
        place = Place(
            body["user"]["team_id"],
            channel,
            body["user"]["id"],
            is_dm=channel.startswith("D"),
            thread_ts=body.get("container", {}).get("thread_ts", ""),
            response_url=body.get("response_url", ""),
            replace_original=True,
        )
        if action.get("value", "").startswith("/"):  # only ever a command the core asked to confirm
            await self._guarded(place, self._converse(place, action["value"]))

    async def _on_home_reset(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        place = Place(body["user"]["team_id"], "", body["user"]["id"], is_dm=True)
        await self._guarded(None, self._publish_home(place, reset=True))

    async def _on_settings_submit(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        opened_from = json.loads(view["private_metadata"])
        place = Place(
            body["user"]["team_id"],
            opened_from["channel"],
            body["user"]["id"],
            is_dm=opened_from["dm"],
            response_url=opened_from["response_url"],
        )
        commands = settings_commands(view["state"]["values"])
        await self._guarded(place, self._submit_settings(ack, place, commands))

    # The core's side

    async def _converse(self, place: Place, text: str, *, event_id: str = "") -> None:
        reply = await self.manager.handle(await self._incoming(place, text, event_id=event_id))
        await self._show(reply, place)

    async def _ask(self, place: Place, text: str) -> Reply:
        return await self.manager.handle(await self._incoming(place, text))

    async def _incoming(self, place: Place, text: str, *, event_id: str = "") -> Incoming:
        return Incoming(
            platform="slack",
            user_id=place.user,
            display_name=await self._display_name(place.user),
            text=text,
            channel_id=place.channel,
            workspace_id=place.workspace,
            thread_id=place.thread_ts,
            is_dm=place.is_dm,
            event_id=event_id,
        )

    async def _open_settings(self, place: Place, trigger_id: str) -> None:
        # The trigger expires 3 s after the command, and the core may first finish an answer for this
        # user here: open the modal at once and fill in the settings when the core has them.
        metadata = json.dumps({"channel": place.channel, "dm": place.is_dm, "response_url": place.response_url})
        opened = await self.client.views_open(
            trigger_id=trigger_id, view=settings_modal("Loading your settings…", metadata=metadata)
        )
        current = await (await self._ask(place, "/settings")).collect()
        await self.client.views_update(view_id=opened["view"]["id"], view=settings_modal(current, metadata=metadata))

    async def _submit_settings(self, ack: AsyncAck, place: Place, commands: list[tuple[str, str]]) -> None:
        applying = asyncio.ensure_future(self._apply_settings(place, commands))
        # Errors are shown in the modal when the core answers in time; otherwise the modal closes and they follow.
        done, _ = await asyncio.wait({applying}, timeout=ACK_DEADLINE)
        if done and applying.result()[0]:
            await ack(response_action="errors", errors=applying.result()[0])
            return
        await ack()
        errors, answers = await applying
        shown = [*errors.values(), *answers[-1:]]  # each answer lists all settings: the last one is enough
        if shown:
            await self._send_whole("\n".join(shown), place, private=True)

    async def _apply_settings(self, place: Place, commands: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
        """Each command's error by modal block, and the answers of those that worked."""
        errors, answers = {}, []
        for block, command in commands:
            reply = await self._ask(place, command)
            text = await reply.collect()
            if reply.error is None:
                answers.append(text)
            else:
                errors[block] = text
        return errors, answers

    async def _publish_home(self, place: Place, *, reset: bool = False) -> None:
        status = await (await self._ask(place, "/reset")).collect() if reset else ""
        settings = await (await self._ask(place, "/settings")).collect()
        usage = await (await self._ask(place, "/usage")).collect()
        await self.client.views_publish(user_id=place.user, view=home_view(settings, usage, status))

    # Showing replies

    async def _show(self, reply: Reply, place: Place) -> None:
        if reply.error is ErrorKind.DUPLICATE:  # Slack sent this event again; it has its answer
            return
        private = reply.ephemeral or reply.error is not None
        if reply.attachment is not None:
            await self._send_file(reply, place)
        elif place.response_url or private or reply.confirm_command:
            text = await reply.collect()
            text = f":warning: {text}" if reply.error is not None else text
            await self._send_whole(text, place, private=private, confirm=reply.confirm_command)
        else:
            if not place.is_dm:
                self._remember(self._threads, (place.workspace, place.channel, place.thread_ts), None)
            stream = MessageStream(
                self.client,
                self.update_budget,
                workspace=place.workspace,
                channel=place.channel,
                thread_ts=place.thread_ts,
                interval=self.update_interval,
                limit=self.message_limit,
            )
            await stream.write(reply.pieces)

    async def _send_whole(self, text: str, place: Place, *, private: bool, confirm: str | None = None) -> None:
        """A reply known in full: through the response_url where there is one, else as (ephemeral) messages."""
        parts = split_message(text, self.message_limit) or [EMPTY_REPLY]
        blocks = confirm_blocks(text, confirm) if confirm else None
        for part in parts[:1] if blocks else parts:
            if place.response_url:
                sent = await AsyncWebhookClient(place.response_url).send(
                    text=part,
                    blocks=blocks,
                    response_type="ephemeral" if private else "in_channel",
                    replace_original=place.replace_original,
                )
                if sent.status_code != 200:  # response_urls expire after 30 minutes
                    log.warning("Slack response_url answered %s: %s", sent.status_code, sent.body)
            elif private and not place.is_dm:
                await self.client.chat_postEphemeral(
                    channel=place.channel, user=place.user, thread_ts=place.thread_ts or None,
                    text=part, blocks=blocks, **NO_PINGS,
                )
            else:
                await self.client.chat_postMessage(
                    channel=place.channel, thread_ts=place.thread_ts or None,
                    text=part, blocks=blocks, **NO_PINGS, **NO_PREVIEWS,
                )

    async def _send_file(self, reply: Reply, place: Place) -> None:
        """A file goes to the user's DM with the bot, never into a channel: an export is private."""
        assert reply.attachment is not None
        text = await reply.collect()
        dm = (await self.client.conversations_open(users=place.user))["channel"]["id"]
        await self.client.files_upload_v2(
            channel=dm,
            content=reply.attachment.content,
            filename=reply.attachment.filename,
            title=reply.attachment.filename,
            initial_comment=escape(text),
        )
        if place.channel != dm:
            await self._send_whole("I sent the file to our direct messages.", place, private=True)

    async def _guarded(self, place: Place | None, work: Awaitable[None]) -> None:
        """Run one request's work: counted for a clean stop; a failure is logged once and told to the user."""
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            await work
        except Exception:
            log.exception("Slack request failed (user %s, channel %s)", place and place.user, place and place.channel)
            if place is not None:
                try:
                    await self._send_whole(f":warning: {FAILURE_TEXT}", place, private=True)
                except Exception:
                    log.warning("could not tell the user about the failure either", exc_info=True)
        finally:
            self._in_flight.discard(task)

    async def _display_name(self, user: str) -> str:
        """The name Slack shows for a user (users.info, remembered); the user id if Slack will not say."""
        if user in self._names:
            return self._names[user]
        try:
            info = (await self.client.users_info(user=user))["user"]
        except SlackApiError as exc:
            log.warning("users.info for %s failed: %s", user, exc)
            return user
        profile = info.get("profile", {})
        name = profile.get("display_name") or profile.get("real_name") or info.get("name") or user
        self._remember(self._names, user, name)
        return name

    @staticmethod
    def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        cache.move_to_end(key)
        if len(cache) > REMEMBERED:
            cache.popitem(last=False)
