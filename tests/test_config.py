"""Settings: validation messages, masking of secrets, and .env.example kept complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import PLATFORM_ENV_NAMES, SHIPPED_MODEL, Settings, describe_error, env_example, env_name, masked

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("BOT_") or name in PLATFORM_ENV_NAMES.values():
            monkeypatch.delenv(name)


BAD_VALUES = [
    ("BOT_TEMPERATURE", "hot", "valid number"),
    ("BOT_TEMPERATURE", "5", "less than or equal to 2"),
    ("BOT_TOP_P", "0", "greater than 0"),
    ("BOT_TOP_K", "-1", "greater than or equal to 0"),
    ("BOT_MAX_REPLY_TOKENS", "0", "greater than or equal to 1"),
    ("BOT_MAX_REPLY_TOKENS", "lots", "valid integer"),
    ("BOT_REPETITION_PENALTY", "0.5", "greater than or equal to 1"),
    ("BOT_DATABASE_URL", "postgresql://localhost/db", "needs an async driver"),
    ("BOT_DATABASE_URL", "  ", "must not be empty"),
    ("BOT_DB_POOL_SIZE", "0", "greater than or equal to 1"),
    ("BOT_DB_POOL_TIMEOUT", "-3", "greater than 0"),
    ("BOT_MODEL_PATH", "/nonexistent/model", "no such folder or .gguf file"),
    ("BOT_DEVICE", "tpu", "'cpu' or 'cuda'"),
    ("BOT_TORCH_THREADS", "-2", "greater than or equal to 0"),
    ("BOT_PRECISION", "int4", "'auto', 'float32', 'bfloat16', 'q8', 'q4' or 'int8'"),
    ("BOT_MAX_BATCH", "0", "greater than or equal to 1"),
    ("BOT_MAX_QUEUED", "-1", "greater than or equal to 0"),
    ("BOT_KV_CACHE_MB", "lots", "valid integer"),
    ("BOT_PREFILL_CHUNK", "0", "greater than or equal to 1"),
    ("BOT_LOG_LEVEL", "LOUD", "'DEBUG', 'INFO', 'WARNING' or 'ERROR'"),
    ("BOT_LOG_FORMAT", "xml", "'text' or 'json'"),
    ("BOT_LOG_CONTENT", "perhaps", "valid boolean"),
    ("BOT_PERSONA", "x" * 2001, "at most 2000 characters"),
    ("BOT_MAX_MESSAGE_CHARS", "0", "greater than or equal to 1"),
    ("BOT_HISTORY_MESSAGES", "-1", "greater than or equal to 0"),
    ("BOT_ADMINS", "discord", "'discord' is not platform:id"),
    ("BOT_ADMINS", "discord:1234,irc:42", "unknown platform 'irc'"),
    ("BOT_ADMINS", "slack:T01ABC/", "'slack:T01ABC/' is not platform:id"),
    ("BOT_ALLOW_USERS", "discord:12 34", "'discord:12 34' is not platform:id"),
    ("BOT_DENY_USERS", "slack:/U02DEF", "'slack:/U02DEF' is not platform:id"),
    ("BOT_ALLOW_CHANNELS", "C123", "'C123' is not platform:id"),
    ("BOT_DENY_CHANNELS", "teams:C1", "unknown platform 'teams'"),
    ("BOT_ALLOW_WORKSPACES", "slack:T01ABC/U02DEF", "'slack:T01ABC/U02DEF' is not platform:workspace"),
    ("BOT_DENY_WORKSPACES", "T01ABC", "'T01ABC' is not platform:workspace"),
    ("BOT_HISTORY_RETENTION_DAYS", "-1", "greater than or equal to 0"),
    ("BOT_HISTORY_RETENTION_DAYS", "forever", "valid integer"),
    ("BOT_DAILY_TOKEN_QUOTA", "-5", "greater than or equal to 0"),
    ("BOT_LINK_CODE_TTL_MINUTES", "0", "greater than or equal to 1"),
    ("BOT_LINK_CODE_TTL_MINUTES", "1441", "less than or equal to 1440"),
    ("BOT_DISCORD_THREADS", "sometimes", "valid boolean"),
    ("BOT_DISCORD_ALLOW_DMS", "maybe", "valid boolean"),
    ("BOT_DISCORD_SHARD_COUNT", "-1", "greater than or equal to 0"),
    ("BOT_DISCORD_SHARD_IDS", "0,x", "'x' is not a shard number"),
    ("BOT_DISCORD_SHARD_IDS", "0,1", "needs BOT_DISCORD_SHARD_COUNT"),
    ("DISCORD_API_BASE", "discord.com/api/v10", "must start with https:// or http://"),
    ("DISCORD_GATEWAY_URL", "https://gateway.discord.gg", "must start with wss:// or ws://"),
    ("SLACK_API_URL", "slack.com/api/", "must start with https:// or http://"),
    ("BOT_HTTP_HOST", "  ", "must not be empty"),
    ("BOT_HTTP_PORT", "-1", "greater than or equal to 0"),
    ("BOT_HTTP_PORT", "65536", "less than or equal to 65535"),
    ("BOT_SLACK_COMMAND", "gpt", "must be / and 1 to 31 lowercase letters"),
    ("BOT_SLACK_COMMAND", "/GPT", "must be / and 1 to 31 lowercase letters"),
]


@pytest.mark.parametrize(("name", "value", "problem"), BAD_VALUES)
def test_each_bad_value_names_variable_problem_and_expectation(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    message = describe_error(caught.value)
    assert message.startswith(f"{name}=")
    assert problem in message
    field = name.removeprefix("BOT_").lower()
    assert f"expected {Settings.model_fields[field].description}" in message


def test_every_setting_is_in_env_example_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    assert text == env_example(), "regenerate with: python run_bot.py check-config --example > .env.example"
    for field in Settings.model_fields:
        assert f"\n{env_name(field)}=" in text


def test_platform_secrets_use_the_platforms_names_and_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", "discord-secret-value")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-secret-value")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "   ")
    settings = Settings(_env_file=None)
    assert settings.discord_token is not None
    assert settings.discord_token.get_secret_value() == "discord-secret-value"
    assert settings.slack_signing_secret is None  # blank means not set
    shown = masked(settings)
    assert shown["DISCORD_TOKEN"] == "********"
    assert shown["SLACK_SIGNING_SECRET"] == "(not set)"
    assert "secret-value" not in repr(settings) + str(shown)


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("BOT_TEMPERATURE=0.3\nSLACK_APP_TOKEN=xapp-1\n")
    settings = Settings(_env_file=env)
    assert settings.temperature == 0.3
    assert settings.slack_app_token is not None


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BOT_") and "TOKEN" not in k and "SECRET" not in k}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_bot.py"), *args],
        env={**base, "BOT_MODEL_PATH": str(SHIPPED_MODEL), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_wrong_value_stops_start_up_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    result = run_cli(env={"BOT_TEMPERATURE": "hot", "BOT_DEVICE": "tpu"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "BOT_TEMPERATURE='hot'" in result.stderr
    assert "BOT_DEVICE='tpu'" in result.stderr


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    result = run_cli("check-config", env={"DISCORD_TOKEN": "very-secret-token", "BOT_TOP_K": "7"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "very-secret-token" not in result.stdout + result.stderr
    assert "DISCORD_TOKEN=********" in result.stdout
    assert "BOT_TOP_K=7" in result.stdout
    assert "SLACK_BOT_TOKEN=(not set)" in result.stdout


@pytest.mark.parametrize("precision", ["int8", "q8", "q4"])
def test_cpu_precisions_are_refused_on_cuda_with_the_alternative(monkeypatch: pytest.MonkeyPatch,
                                                                 precision: str) -> None:
    monkeypatch.setenv("BOT_DEVICE", "cuda")
    monkeypatch.setenv("BOT_PRECISION", precision)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)
    expected = f"BOT_PRECISION='{precision}': {precision} runs on CPU only; use bfloat16 with BOT_DEVICE=cuda"
    assert expected in describe_error(caught.value)


def test_engine_settings_reach_the_engine() -> None:
    from model.checkpoint import load_model
    from model.engine import InferenceEngine
    from run_bot import engine_options

    settings = Settings(_env_file=None, precision="int8", max_batch=3, max_queued=5, kv_cache_mb=1, prefill_chunk=32)
    engine = InferenceEngine(load_model(SHIPPED_MODEL), **engine_options(settings))
    try:
        assert (engine.precision, engine.max_batch, engine.max_waiting, engine.cache_mb, engine.prefill_chunk) == (
            "int8", 3, 5, 1, 32
        )
    finally:
        engine.close()
