"""run_bot.py as a real process for tests: a model folder it can load, its environment, its pipe and output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fakes.reciting_model import reciting_model
from model.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def reciting_model_folder(folder: Path, script: list[str]) -> Path:
    """A model folder whose model recites script (see fakes/reciting_model.py), for BOT_MODEL_PATH."""
    loaded = reciting_model(script)
    save_checkpoint(folder, loaded.model, loaded.tokenizer)
    return folder


def bot_env(database_url: str, model: Path, **extra: str) -> dict[str, str]:
    """This environment without any BOT_ setting or platform secret, plus the bot's own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BOT_") and "TOKEN" not in k and "SECRET" not in k}
    return {
        **base,
        "BOT_DATABASE_URL": database_url,
        "BOT_MODEL_PATH": str(model),
        "BOT_PERSONA": "Hi.",  # short: the reciting model's window is 64 tokens
        "BOT_HTTP_PORT": "0",
        "BOT_RATE_LIMIT": "0/minute",
        **extra,
    }


@contextmanager
def running_bot(folder: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """run_bot.py in folder, reading lines from a pipe the test keeps open; output goes to files (see output())."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_bot.py")],
            stdin=subprocess.PIPE, stdout=out, stderr=err, env=env, cwd=folder, text=True,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def send(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()


def output(folder: Path) -> tuple[list[str], str]:
    """The reply lines and the log of the bot that ran in folder."""
    return (folder / "out.txt").read_text().splitlines(), (folder / "err.txt").read_text()
