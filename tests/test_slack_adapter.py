"""The Slack adapter end to end: the real slack-bolt app on loopback, the shipped model, a real database,
and a fake Slack (tests/fakes/slack_api.py) that signs requests to the bot and records what the bot sends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.config import SHIPPED_MODEL, Settings
from bot.sessions import SessionManager
from bot.slack_adapter import EVENTS_PATH, SlackAdapter, SlackSetupError, slack_client
from bot.slack_format import escape, from_slack, split_message
from bot.slack_stream import MessageStream, UpdateBudget
from bot.slack_views import CONFIRM_ACTION, HOME_RESET_ACTION
from fakes.reciting_model import recital, reciting_model
from fakes.slack_api import Call, FakeSlack, unescaped
from model.checkpoint import LoadedModel, load_model
from model.engine import InferenceEngine
from storage.db import make_engine, make_session_factory
from storage.models import Message

ROOT = Path(__file__).resolve().parent.parent
USER, OTHER = "U0ANN", "U0BOB"
# What the reciting model says, one token each: "Sure <!channel>, (<!here>) <@UBOB>& more words."
SCRIPT = ["Sure", " <!", "channel", ">,", " (<!", "here", ">)", " <@", "UBOB", ">&", " more", " words", "."]


@dataclass
class Bot:
    adapter: SlackAdapter
    port: int

    @property
    def url(self) -> str:
        """The bot's endpoint for the Events API, slash commands and interactivity."""
        return f"http://127.0.0.1:{self.port}{EVENTS_PATH}"


Start = Callable[..., Awaitable[Bot]]


@pytest.fixture(scope="module")
def shipped() -> LoadedModel:
    return load_model(SHIPPED_MODEL)


@pytest.fixture(scope="module")
def reciting() -> LoadedModel:
    """A real GPT with hand-set weights (tests/fakes/reciting_model.py): its replies recite SCRIPT."""
    return reciting_model(SCRIPT)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as fake:
        yield fake
        # Whatever the model or a user wrote, nothing the bot sent may read as a ping or a link.
        assert fake.unescaped_texts() == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def start_bot(slack: FakeSlack, db_url: str, shipped: LoadedModel) -> AsyncIterator[Start]:
    """Starts the adapter (HTTP mode, or Socket Mode with socket_mode=True) over the test's database and the
    shipped model (or another); stops everything afterwards."""
    async with AsyncExitStack() as stack:

        async def start(
            *,
            socket_mode: bool = False,
            model: LoadedModel = shipped,
            interval: float = 0.05,
            message_limit: int = 3000,
            **overrides: Any,
        ) -> Bot:
            secret = {"slack_signing_secret": slack.signing_secret}
            mode = {"slack_app_token": slack.app_token} if socket_mode else secret
            values = {
                "database_url": db_url,
                "max_reply_tokens": 12,
                "rate_limit": "0/minute",
                "slack_bot_token": slack.bot_token,
                "slack_api_url": slack.api_url,
                "http_port": free_port(),
                **mode,
            }
            settings = Settings(_env_file=None, **{**values, **overrides})
            db = make_engine(settings.database_url)
            stack.push_async_callback(db.dispose)
            engine = InferenceEngine(model)
            stack.callback(engine.close)
            manager = SessionManager(settings, make_session_factory(db), engine)
            stack.push_async_callback(manager.close)
            adapter = SlackAdapter(
                manager, settings, slack_client(settings), update_interval=interval, message_limit=message_limit
            )
            await adapter.start()
            stack.push_async_callback(adapter.stop)
            return Bot(adapter, settings.http_port)

        yield start


def dm(text: str, *, user: str = USER, ts: str = "100.000001") -> dict[str, Any]:
    return {"type": "message", "channel_type": "im", "channel": "D" + user, "user": user, "text": text, "ts": ts}


def mention(text: str, *, channel: str = "C0GENERAL", ts: str = "200.000001") -> dict[str, Any]:
    return {"type": "app_mention", "channel": channel, "user": USER, "text": f"<@UBOT> {text}", "ts": ts}


async def stored_replies(db_url: str) -> list[str]:
    """The bot's replies as the core stored them."""
    db = make_engine(db_url)
    async with make_session_factory(db)() as session:
        replies = list(await session.scalars(select(Message.text).where(Message.role == "bot").order_by(Message.id)))
    await db.dispose()
    return replies


def shown(slack: FakeSlack, post: Call) -> str:
    """A posted message's text as it stands after every edit."""
    return slack.message_text(post.args["channel"], post.result["ts"])


async def test_a_mention_is_answered_in_its_thread_and_the_thread_goes_on(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    sent = await slack.send_event(bot.url, mention("hello there"), event_id="Ev1")
    assert sent.status == 200
    [post] = await slack.wait_for("chat.postMessage")
    assert post.args["channel"] == "C0GENERAL" and post.args["thread_ts"] == "200.000001"

    # Without a mention: a top-level channel message is not for the bot; a reply in its thread is.
    chatter = {"type": "message", "channel": "C0GENERAL", "user": OTHER, "text": "lunch?", "ts": "300.1"}
    await slack.send_event(bot.url, chatter, event_id="Ev2")
    await slack.send_event(bot.url, {**chatter, "text": "and then?", "thread_ts": "200.000001"}, event_id="Ev3")
    posts = await slack.wait_for("chat.postMessage", 2)
    assert posts[1].args["thread_ts"] == "200.000001"
    await bot.adapter.stop()  # waits for answers in progress: every call has reached the fake
    assert len(slack.called("chat.postMessage")) == 2
    assert slack.called("users.info")[0].args["user"] == USER


async def test_a_dm_is_answered_in_the_dm_streamed_into_one_message(
    slack: FakeSlack, start_bot: Start, db_url: str, reciting: LoadedModel
) -> None:
    tokens = 3 * len(SCRIPT)
    bot = await start_bot(model=reciting, max_reply_tokens=tokens, interval=0.02)
    await slack.send_event(bot.url, dm("tell me a long story about your day"), event_id="Ev1")
    [post] = await slack.wait_for("chat.postMessage")
    assert post.args["channel"] == "D" + USER and "thread_ts" not in post.args
    await bot.adapter.stop()
    updates = slack.called("chat.update")
    assert {u.args["ts"] for u in updates} == {post.result["ts"]}, "the answer grows in place"
    texts = [post.args["text"], *(u.args["text"] for u in updates)]
    assert texts[0] == "Sure", "the first message goes out with the first words"
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    writes = [post, *updates]
    assert all(b.at - a.at >= 0.019 for a, b in zip(writes, writes[1:])), "at most one edit per interval"
    assert texts[-1] == escape(recital(SCRIPT, tokens))
    [stored] = await stored_replies(db_url)
    assert from_slack(texts[-1]) == stored, "the message ends with the whole reply, as stored"


async def test_the_slash_command_is_acknowledged_at_once_then_answered(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    sent = await slack.send_command(bot.url, "/gpt", "reset", user=USER, channel="C0GENERAL")
    assert sent.status == 200 and sent.body == "" and sent.seconds < 3.0, "an empty acknowledgement, in time"
    [answer] = await slack.wait_for("response_url")
    assert answer.args["text"]
    assert answer.args["response_type"] == "in_channel", "the core does not mark /reset private"

    await slack.send_command(bot.url, "/gpt", "", user=USER, channel="C0GENERAL")
    help_answer = (await slack.wait_for("response_url", 2))[1]
    assert help_answer.args["response_type"] == "ephemeral"
    assert "/reset" in help_answer.args["text"], "`/gpt` alone is the core's /help"
    assert slack.called("chat.postMessage") == []


async def test_private_answers_to_mentions_are_ephemeral(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    await slack.send_event(bot.url, mention("/usage"), event_id="Ev1")
    [note] = await slack.wait_for("chat.postEphemeral")
    assert note.args["user"] == USER and note.args["channel"] == "C0GENERAL" and note.args["thread_ts"] == "200.000001"
    assert slack.called("chat.postMessage") == []


async def test_settings_modal_opens_and_its_submission_changes_the_setting(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    sent = await slack.send_command(bot.url, "/gpt", "settings", user=USER, channel="C0GENERAL")
    assert sent.status == 200 and sent.seconds < 3.0
    [opened] = await slack.wait_for("views.open")
    modal = opened.args["view"]
    assert modal["type"] == "modal"
    assert [b["block_id"] for b in modal["blocks"] if b["type"] == "input"] == ["persona", "temperature", "length"]
    [update] = await slack.wait_for("views.update")
    view = slack.view(update.args["view_id"])
    assert "temperature" in json.dumps(view["blocks"]), "the modal shows the current settings"

    bad = await slack.send_interaction(bot.url, slack.submission(view, {"temperature": "7"}, user=USER))
    assert bad.status == 200
    assert set(json.loads(bad.body)["errors"]) == {"temperature"}, "a refused value is shown in the modal"

    values = {"temperature": "0.3", "length": "8"}
    good = await slack.send_interaction(bot.url, slack.submission(view, values, user=USER))
    assert good.status == 200 and good.body == "", "the modal closes"
    [answer] = await slack.wait_for("response_url")
    assert answer.args["response_type"] == "ephemeral" and "0.3" in answer.args["text"]

    await slack.send_command(bot.url, "/gpt", "settings", user=USER, channel="C0GENERAL")
    updates = await slack.wait_for("views.update", 2)
    reopened = json.dumps(updates[1].args["view"]["blocks"])
    assert "0.3" in reopened and "8 tokens" in reopened, "the new values are stored"


async def test_forget_asks_with_a_button_that_confirms(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    await slack.send_command(bot.url, "/gpt", "forget", user=USER, channel="C0GENERAL")
    [question] = await slack.wait_for("response_url")
    assert question.args["response_type"] == "ephemeral"
    [button] = [e for b in question.args["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert button["action_id"] == CONFIRM_ACTION and button["value"] == "/forget confirm"

    click = slack.click(button, user=USER, channel="C0GENERAL", response_url=question.args["url"])
    clicked = await slack.send_interaction(bot.url, click)
    assert clicked.status == 200
    answer = (await slack.wait_for("response_url", 2))[1]
    assert answer.args["replace_original"] is True and answer.args["text"] != question.args["text"]
    assert "blocks" not in answer.args, "the button is gone"


async def test_export_arrives_as_a_file_in_the_dm(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    await slack.send_event(bot.url, dm("hello"), event_id="Ev1")
    await slack.wait_for("chat.postMessage")
    await slack.send_command(bot.url, "/gpt", "export", user=USER, channel="C0GENERAL")
    [note] = await slack.wait_for("response_url")
    assert note.args["response_type"] == "ephemeral"
    [done] = slack.called("files.completeUploadExternal")
    assert done.args["channel_id"] == "D" + USER
    data = json.loads(slack.uploads[done.args["files"][0]["id"]])
    assert "hello" in json.dumps(data)


async def test_app_home_shows_settings_and_usage_with_a_reset_button(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    opened = {"type": "app_home_opened", "user": USER, "channel": "D" + USER, "tab": "home"}
    await slack.send_event(bot.url, opened, event_id="Ev1")
    [published] = await slack.wait_for("views.publish")
    home = published.args["view"]
    assert published.args["user_id"] == USER and home["type"] == "home"
    [button] = [e for b in home["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert button["action_id"] == HOME_RESET_ACTION

    view = {**home, "id": "VHOME"}
    await slack.send_interaction(bot.url, slack.click(button, user=USER, view=view))
    again = (await slack.wait_for("views.publish", 2))[1]
    assert len(again.args["view"]["blocks"]) > len(home["blocks"]), "the reset's answer is shown"


async def test_bad_signature_or_old_timestamp_get_401_and_no_answer(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    forged = await slack.send_event(bot.url, dm("hi"), event_id="Ev1", secret="not-the-secret")
    stale = await slack.send_event(bot.url, dm("hi"), event_id="Ev2", timestamp=int(time.time()) - 600)
    form = "application/x-www-form-urlencoded"
    forged_command = await slack.post(bot.url, "command=/gpt&text=reset", secret="wrong", content_type=form)
    assert (forged.status, stale.status, forged_command.status) == (401, 401, 401)
    challenge = await slack.post(bot.url, json.dumps({"type": "url_verification", "challenge": "c-123"}))
    assert challenge.status == 200 and "c-123" in challenge.body, "Slack's check of the events URL is answered"
    ok = await slack.send_event(bot.url, dm("hi"), event_id="Ev3")
    assert ok.status == 200
    await slack.wait_for("chat.postMessage")
    await bot.adapter.stop()
    assert len(slack.called("chat.postMessage")) == 1 and slack.called("response_url") == []


async def test_a_retried_event_gets_exactly_one_answer(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot()
    event = mention("are you there?")
    sent = await asyncio.gather(
        slack.send_event(bot.url, event, event_id="EvSame"),
        slack.send_event(bot.url, event, event_id="EvSame", retry=1),
        slack.send_event(bot.url, event, event_id="EvSame", retry=2),
    )
    assert [s.status for s in sent] == [200, 200, 200]
    await slack.wait_for("chat.postMessage")
    await bot.adapter.stop()
    assert len(slack.called("chat.postMessage")) == 1
    assert slack.called("chat.postEphemeral") == []


async def test_user_text_with_slack_markup_comes_back_escaped(slack: FakeSlack, start_bot: Start) -> None:
    # Slack delivers a typed "<!channel> & <@U0BOB>" escaped; the core stores it as typed and /history echoes it.
    bot = await start_bot()
    await slack.send_event(bot.url, dm("&lt;!channel&gt; &amp; &lt;@U0BOB&gt; hi"), event_id="Ev1")
    await slack.wait_for("chat.postMessage")
    await slack.send_command(bot.url, "/gpt", "history", user=USER, channel="D" + USER)
    [history] = await slack.wait_for("response_url")
    assert "&lt;!channel&gt; &amp; &lt;@U0BOB&gt; hi" in history.args["text"]
    assert not unescaped(history.args["text"])


async def test_model_output_that_would_ping_or_link_is_escaped(
    slack: FakeSlack, start_bot: Start, reciting: LoadedModel
) -> None:
    bot = await start_bot(model=reciting, max_reply_tokens=len(SCRIPT))
    await slack.send_event(bot.url, mention("say it"), event_id="Ev1")
    [post] = await slack.wait_for("chat.postMessage")
    await bot.adapter.stop()
    text = shown(slack, post)
    assert text == escape(recital(SCRIPT, len(SCRIPT)))
    assert "&lt;!channel&gt;, (&lt;!here&gt;) &lt;@UBOB&gt;&amp;" in text
    assert slack.called("chat.postMessage")[0].args["link_names"] is False


async def test_allow_lists_refuse_with_a_short_private_message(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot(allow_workspaces="slack:T0ELSEWHERE")
    await slack.send_event(bot.url, mention("hello"), event_id="Ev1")
    [refusal] = await slack.wait_for("chat.postEphemeral")
    assert refusal.args["user"] == USER and refusal.args["text"].startswith(":warning:")
    assert len(refusal.args["text"]) < 200
    assert slack.called("chat.postMessage") == []


async def test_socket_mode_is_chosen_with_an_app_token_and_answers_once(slack: FakeSlack, start_bot: Start) -> None:
    bot = await start_bot(socket_mode=True)
    assert slack.called("apps.connections.open"), "the app token was used to open the socket"
    with pytest.raises(OSError):  # and no HTTP endpoint was opened
        await asyncio.open_connection("127.0.0.1", bot.port)
    ack = await slack.send_socket_event(dm("hello over the socket"), event_id="EvS")
    retry_ack = await slack.send_socket_event(dm("hello over the socket"), event_id="EvS", retry=1)
    assert ack.args["envelope_id"] != retry_ack.args["envelope_id"], "each delivery is acknowledged"
    [post] = await slack.wait_for("chat.postMessage")
    assert post.args["channel"] == "D" + USER
    await bot.adapter.stop()
    assert len(slack.called("chat.postMessage")) == 1, "the redelivery is not answered again"


async def test_wrong_tokens_and_a_busy_port_are_setup_errors(slack: FakeSlack, start_bot: Start) -> None:
    with pytest.raises(SlackSetupError, match="SLACK_BOT_TOKEN: invalid_auth"):
        await start_bot(slack_bot_token="xoxb-wrong")
    with pytest.raises(SlackSetupError, match="SLACK_APP_TOKEN: invalid_auth"):
        await start_bot(socket_mode=True, slack_app_token="xapp-wrong")
    bot = await start_bot()
    with pytest.raises(SlackSetupError, match=f"BOT_HTTP_HOST:BOT_HTTP_PORT=127.0.0.1:{bot.port}"):
        await start_bot(http_port=bot.port)


async def test_long_answers_are_split_within_the_limit(
    slack: FakeSlack, start_bot: Start, reciting: LoadedModel
) -> None:
    bot = await start_bot(model=reciting, max_reply_tokens=4 * len(SCRIPT), message_limit=60)
    await slack.send_event(bot.url, dm(" ".join(f"word{i}" for i in range(20))), event_id="Ev1")
    await slack.wait_for("chat.postMessage")
    # A reply known in full (/history, which echoes the long message) is split the same way.
    await slack.send_event(bot.url, mention("/history"), event_id="Ev2")
    await bot.adapter.stop()
    parts = [shown(slack, p) for p in slack.called("chat.postMessage")]
    assert len(parts) >= 4 and all(len(p) <= 60 for p in parts)
    assert " ".join(parts) == escape(recital(SCRIPT, 4 * len(SCRIPT))), "nothing lost or repeated between messages"
    history = [c.args["text"] for c in slack.called("chat.postEphemeral")]
    assert len(history) >= 3 and all(len(h) <= 60 for h in history)
    assert " ".join(history).count("word") == 20


async def test_stream_merges_pieces_when_the_workspace_budget_is_short(slack: FakeSlack) -> None:
    # The stream writer on its own, with pieces arriving faster than Slack may be edited.
    budget = UpdateBudget(per_minute=3)

    async def pieces() -> AsyncIterator[str]:
        for i in range(40):
            yield f"word{i} <!here> "
            await asyncio.sleep(0.01)

    client = slack_client(Settings(_env_file=None, slack_bot_token=slack.bot_token, slack_api_url=slack.api_url))
    stream = MessageStream(client, budget, workspace="T0TEST", channel="C1", interval=0.05, limit=3000)
    await stream.write(pieces())
    [post] = slack.called("chat.postMessage")
    updates = slack.called("chat.update")
    assert len(updates) == 3 + 1, "three within the budget, then the final edit that must be sent"
    whole = "".join(f"word{i} <!here> " for i in range(40))
    assert updates[-1].args["text"] == escape(whole).strip()
    texts = [post.args["text"], *(u.args["text"] for u in updates)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "each edit carries all text so far"
    writes = [post, *updates]
    assert all(b.at - a.at >= 0.049 for a, b in zip(writes, writes[1:])), "at most one edit per interval"
    assert budget.take("T0TEST") is False and budget.take("T0OTHER") is True, "the budget is per workspace"


async def test_stream_posts_early_and_goes_on_in_new_messages_at_the_limit(slack: FakeSlack) -> None:
    last_piece_at = 0.0

    async def pieces() -> AsyncIterator[str]:
        nonlocal last_piece_at
        for i in range(20):
            yield f"piece{i} & "
            await asyncio.sleep(0.01)
        last_piece_at = time.monotonic()

    client = slack_client(Settings(_env_file=None, slack_bot_token=slack.bot_token, slack_api_url=slack.api_url))
    stream = MessageStream(
        client, UpdateBudget(), workspace="T0TEST", channel="C1", thread_ts="5.5", interval=0.0, limit=30
    )
    await stream.write(pieces())
    posts = slack.called("chat.postMessage")
    assert posts[0].at < last_piece_at, "the first message does not wait for the whole reply"
    finals = [shown(slack, p) for p in posts]
    assert len(posts) >= 7 and all(len(t) <= 30 for t in finals)
    assert {p.args["thread_ts"] for p in posts} == {"5.5"}
    assert " ".join(finals) == escape("".join(f"piece{i} & " for i in range(20))).strip()


def test_update_budget_frees_up_after_a_minute() -> None:
    now = [0.0]
    budget = UpdateBudget(per_minute=2, clock=lambda: now[0])
    assert [budget.take("T"), budget.take("T"), budget.take("T")] == [True, True, False]
    assert budget.take("T", force=True), "a final edit is always allowed"
    now[0] = 60.0
    assert budget.take("T")


def test_escape_stops_pings_and_links_in_model_like_text() -> None:
    text = "Sure! <!channel> <!here> <@U123> <#C1|general> <https://evil.example|click> & done >_<"
    out = escape(text)
    assert "<" not in out and ">" not in out
    assert out.count("&amp;") == 1 and out.startswith("Sure! &lt;!channel&gt;")
    assert from_slack(out) == text, "what Slack delivers back is what was meant"


def test_incoming_markup_becomes_plain_text() -> None:
    raw = "<@UBOT> ask <@U0BOB|bob> in <#C1|general> about <https://x.example|this> &amp; <!here> &lt;b&gt;"
    assert from_slack(raw, "UBOT") == "ask @bob in #general about this & @here <b>"


def test_split_breaks_at_spaces_and_keeps_earlier_parts_fixed() -> None:
    text = "one two three four five six seven eight nine ten & eleven"
    parts = split_message(text, 20)
    assert all(len(p) <= 20 for p in parts) and " ".join(parts) == escape(text)
    # A part's end depends only on the text before it: streaming more text changes only the last part.
    assert split_message(text + " twelve thirteen", 20)[: len(parts) - 1] == parts[:-1]


def test_the_manifest_asks_for_what_the_adapter_uses() -> None:
    yaml = pytest.importorskip("yaml")
    manifest = yaml.safe_load((ROOT / "slack-app-manifest.yml").read_text())
    [command] = manifest["features"]["slash_commands"]
    assert command["command"] == Settings.model_fields["slack_command"].default
    events = set(manifest["settings"]["event_subscriptions"]["bot_events"])
    assert {"app_mention", "message.im", "message.channels", "message.groups", "app_home_opened"} <= events
    assert manifest["settings"]["interactivity"]["is_enabled"], "buttons and the settings modal"
    assert manifest["features"]["app_home"]["home_tab_enabled"]
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    # events, answers, the command, display names, the export's DM and its file
    needed = {"app_mentions:read", "im:history", "channels:history", "groups:history", "chat:write", "commands"}
    assert needed | {"users:read", "im:write", "files:write"} <= scopes


def test_slack_needs_a_signing_secret_or_an_app_token() -> None:
    settings = Settings(_env_file=None, slack_bot_token="xoxb-1")
    with pytest.raises(SlackSetupError, match="SLACK_SIGNING_SECRET"):
        SlackAdapter(None, settings, slack_client(settings))  # type: ignore[arg-type]


async def run_bot(slack: FakeSlack, tmp_path: Path, **env: str) -> asyncio.subprocess.Process:
    """run_bot.py as an admin starts it, configured through the environment only, against the fake Slack."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "SLACK_", "DISCORD_"))}
    slack_env = {
        "SLACK_BOT_TOKEN": slack.bot_token,
        "SLACK_SIGNING_SECRET": slack.signing_secret,
        "SLACK_API_URL": slack.api_url,
        "BOT_MAX_REPLY_TOKENS": "8",
        "BOT_LOG_LEVEL": "INFO",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "run_bot.py"),
        env={**base, **slack_env, **env},
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(process: asyncio.subprocess.Process, *, timeout: float) -> str:
    """The process's standard error once it has ended; a process still running after timeout is interrupted."""
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 30)
        pytest.fail(f"run_bot.py did not end within {timeout} s; its log:\n{err.decode()[-4000:]}")
    return err.decode()


async def test_run_bot_serves_slack_over_http_until_interrupted(slack: FakeSlack, tmp_path: Path) -> None:
    port = free_port()
    process = await run_bot(slack, tmp_path, BOT_HTTP_PORT=str(port))
    try:
        await slack.wait_for("auth.test", timeout=60)  # model loaded, database migrated, adapter starting
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        sent = await slack.send_event(f"http://127.0.0.1:{port}{EVENTS_PATH}", dm("hello"), event_id="Ev1")
        assert sent.status == 200
        [post] = await slack.wait_for("chat.postMessage")
        assert post.args["channel"] == "D" + USER
    finally:
        process.send_signal(signal.SIGINT)
        err = await finished(process, timeout=60)
    assert process.returncode == 0, err
    assert f"listening on http://127.0.0.1:{port}/slack/events" in err
    assert "Traceback" not in err


async def test_run_bot_names_a_refused_token_without_a_traceback(slack: FakeSlack, tmp_path: Path) -> None:
    process = await run_bot(slack, tmp_path, SLACK_BOT_TOKEN="xoxb-revoked", BOT_HTTP_PORT=str(free_port()))
    err = await finished(process, timeout=120)
    assert process.returncode == 2, err
    assert "Error: Slack refused SLACK_BOT_TOKEN: invalid_auth" in err
    assert "Traceback" not in err
