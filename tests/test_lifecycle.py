"""Stopping and crashing with real processes: SIGTERM mid-reply shuts down in order, SIGKILL loses no stored turn.

The bot runs as `run_bot.py` with the terminal adapter on a pipe, a SQLite file and a
model folder written by the test: the reciting model (tests/fakes/reciting_model.py),
whose replies are known in advance and never end early, so a long reply is still being
generated when the signal comes.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fakes.reciting_model import recital
from processes import ROOT, bot_env, output, reciting_model_folder, running_bot, send

SCRIPT = ["Once", " upon", " a", " time", ",", " there", " lived", " one", " bot", "."]
LONG = 4000  # tokens: seconds of generation, so a signal lands in the middle of the reply


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reciting_model_folder(tmp_path_factory.mktemp("reciting-model"), SCRIPT)


def sqlite_env(db: Path, model: Path, **extra: str) -> dict[str, str]:
    return bot_env(f"sqlite+aiosqlite:///{db}", model, **extra)


def stored(db: Path) -> list[tuple[int, str, str, str]]:
    """(conversation, role, status, text) of every message; [] before the bot has made its tables."""
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT conversation_id, role, status, text FROM messages ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # no such table yet
        return []


def wait_for_user_message(db: Path, text: str, process: subprocess.Popen[str], timeout: float = 120.0) -> None:
    """Until the bot has stored text: then its reply is being generated."""
    deadline = time.monotonic() + timeout
    while not any(row[1] == "user" and row[3] == text for row in stored(db)):
        assert process.poll() is None, "the bot ended early"
        assert time.monotonic() < deadline, "the bot never stored the message"
        time.sleep(0.02)


def test_sigterm_mid_reply_lets_it_finish_then_exits_0(tmp_path: Path, model_folder: Path) -> None:
    db = tmp_path / "bot.db"
    # a busy machine may take minutes over the story: only the signal may end it, not the reply timeout
    env = sqlite_env(db, model_folder, BOT_MAX_REPLY_TOKENS=str(LONG), BOT_SHUTDOWN_GRACE="300",
                     BOT_REPLY_TIMEOUT="600")
    with running_bot(tmp_path, env) as bot:
        send(bot, "tell me a story")
        wait_for_user_message(db, "tell me a story", bot)
        bot.send_signal(signal.SIGTERM)
        send(bot, "are you there?")  # read after the reply, if at all: the bot is shutting down
        assert bot.wait(timeout=600) == 0
    lines, err = output(tmp_path)
    story = recital(SCRIPT, LONG)
    assert lines[0] == story, err
    assert lines[1:] in ([], ["I am shutting down for a moment. Please send that again in a minute."])
    assert [row[1:] for row in stored(db)] == [("user", "ok", "tell me a story"), ("bot", "ok", story)]
    assert "SIGTERM: shutting down" in err


def test_sigterm_past_the_grace_cancels_the_reply_and_records_it_as_cancelled(tmp_path: Path, model_folder: Path) -> None:
    db = tmp_path / "bot.db"
    env = sqlite_env(db, model_folder, BOT_MAX_REPLY_TOKENS=str(LONG), BOT_SHUTDOWN_GRACE="0")
    with running_bot(tmp_path, env) as bot:
        send(bot, "tell me a story")
        wait_for_user_message(db, "tell me a story", bot)
        bot.send_signal(signal.SIGTERM)
        assert bot.wait(timeout=120) == 0
    lines, err = output(tmp_path)
    assert lines[0].endswith("(I stopped: I am shutting down. Ask again in a minute.)"), err
    rows = stored(db)
    assert [row[1:3] for row in rows] == [("user", "ok"), ("bot", "cancelled")]
    partial = rows[1][3]
    assert len(partial) < len(recital(SCRIPT, LONG)) and recital(SCRIPT, LONG).startswith(partial)


def test_sigkill_mid_reply_keeps_the_message_and_the_next_start_goes_on(tmp_path: Path, model_folder: Path) -> None:
    db = tmp_path / "bot.db"
    with running_bot(tmp_path, sqlite_env(db, model_folder, BOT_MAX_REPLY_TOKENS=str(LONG))) as bot:
        send(bot, "tell me a story")
        wait_for_user_message(db, "tell me a story", bot)
        bot.kill()
        assert bot.wait(timeout=60) == -signal.SIGKILL
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    restart = subprocess.run(
        [sys.executable, str(ROOT / "run_bot.py")],
        input="what happened?\n", env=sqlite_env(db, model_folder, BOT_MAX_REPLY_TOKENS="12"),
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert restart.returncode == 0, restart.stderr
    assert restart.stdout.splitlines() == [recital(SCRIPT, 12)]
    rows = stored(db)
    assert [row[1:] for row in rows] == [
        ("user", "ok", "tell me a story"),  # its reply died with the process: no bot message, which is fine
        ("user", "ok", "what happened?"),
        ("bot", "ok", recital(SCRIPT, 12)),
    ]
    assert len({row[0] for row in rows}) == 1, "the same conversation goes on"
