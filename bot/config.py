"""The bot's settings: one pydantic-settings class read from the environment and `.env`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The model that ships with the bot, found beside the code so any working directory works.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "shipped"

SECRET_ENV_NAMES = {
    "discord_token": "DISCORD_TOKEN",
    "slack_bot_token": "SLACK_BOT_TOKEN",
    "slack_signing_secret": "SLACK_SIGNING_SECRET",
    "slack_app_token": "SLACK_APP_TOKEN",
}


class Settings(BaseSettings):
    """Everything an admin can tune. Built once in run_bot.py and handed down; tests build their own."""

    model_config = SettingsConfigDict(
        env_prefix="BOT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # Storage
    database_url: str = Field(
        "sqlite+aiosqlite:///data/bot.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db",
    )
    db_pool_size: int = Field(5, ge=1, le=1000, description="connections kept open (PostgreSQL), 1 to 1000")
    db_max_overflow: int = Field(10, ge=0, le=1000, description="extra connections under load (PostgreSQL), 0 to 1000")
    db_pool_timeout: float = Field(30.0, gt=0, description="seconds to wait for a free connection, above 0")

    # Model
    model_path: Path = Field(
        SHIPPED_MODEL,
        description="model folder: ours (config.json + tokenizer.json + model.safetensors) or a GPT-2-family folder",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs: cpu or cuda")
    torch_threads: int = Field(0, ge=0, le=256, description="torch CPU threads, 0 = torch's default")

    # Replies
    persona: str = Field(
        "I am a friendly chat bot. I answer briefly and kindly.",
        max_length=2000,
        description="the bot's persona, shown to the model before the conversation (at most 2000 characters)",
    )
    temperature: float = Field(0.8, ge=0.0, le=2.0, description="sampling temperature, 0 (greedy) to 2")
    top_k: int = Field(50, ge=0, description="sample among the k likeliest tokens, 0 = off")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling mass, above 0 up to 1 (1 = off)")
    repetition_penalty: float = Field(1.1, ge=1.0, le=3.0, description="penalty on repeated tokens, 1 (off) to 3")
    max_reply_tokens: int = Field(96, ge=1, le=4096, description="longest reply in tokens, 1 to 4096")
    max_message_chars: int = Field(
        4000, ge=1, le=100_000, description="longest user message accepted, in characters, 1 to 100000"
    )
    history_messages: int = Field(
        200, ge=0, le=10_000, description="most recent messages read from the database when building a prompt"
    )

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="log level: DEBUG, INFO, WARNING or ERROR"
    )

    # Platform secrets, under the platforms' usual names (no BOT_ prefix).
    discord_token: SecretStr | None = Field(
        None, validation_alias="DISCORD_TOKEN", description="Discord bot token; enables the Discord adapter"
    )
    slack_bot_token: SecretStr | None = Field(
        None, validation_alias="SLACK_BOT_TOKEN", description="Slack bot token (xoxb-...); enables the Slack adapter"
    )
    slack_signing_secret: SecretStr | None = Field(
        None, validation_alias="SLACK_SIGNING_SECRET", description="Slack signing secret, for HTTP mode"
    )
    slack_app_token: SecretStr | None = Field(
        None, validation_alias="SLACK_APP_TOKEN", description="Slack app-level token (xapp-...); enables Socket Mode"
    )

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        scheme = value.split("://", 1)[0]
        if "://" not in value or scheme not in {"sqlite+aiosqlite", "postgresql+asyncpg"}:
            raise ValueError("needs an async driver")
        return value

    @field_validator("model_path")
    @classmethod
    def _model_folder(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError("no such folder")
        return value

    @field_validator("persona")
    @classmethod
    def _printable(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("discord_token", "slack_bot_token", "slack_signing_secret", "slack_app_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return SECRET_ENV_NAMES.get(field) or "BOT_" + field.upper()


def describe_error(error: ValidationError) -> str:
    """One line per bad setting: the variable, the value's problem and what is expected."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = env_name(field) if field in Settings.model_fields else field.upper()
        info = Settings.model_fields.get(field)
        value = "(hidden)" if field in SECRET_ENV_NAMES else repr(item.get("input"))
        problem = item["msg"].removeprefix("Value error, ")
        expected = f"; expected {info.description}" if info and info.description else ""
        lines.append(f"{name}={value}: {problem}{expected}")
    return "\n".join(lines)


def masked(settings: Settings) -> dict[str, str]:
    """The effective settings by variable name, secrets shown only as set or not."""
    shown = {}
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if field in SECRET_ENV_NAMES:
            shown[env_name(field)] = "********" if value is not None else "(not set)"
        else:
            shown[env_name(field)] = str(value)
    return shown


def env_example() -> str:
    """The text of `.env.example`: every setting with a comment and its default."""
    parts = ["# Settings of the bot; copy to .env and change what you need. Values shown are the defaults.\n"]
    for field, info in Settings.model_fields.items():
        default = info.default
        if field == "model_path":
            default = "model/shipped"
        parts.append(f"# {info.description}\n{env_name(field)}={'' if default is None else default}\n")
    return "\n".join(parts)
