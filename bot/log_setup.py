"""Logging for the running bot: text or JSON lines on standard error, with every configured secret redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, TextIO

from pydantic import SecretStr
from sqlalchemy.engine import make_url

from bot.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
# The attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def secret_values(settings: Settings) -> list[str]:
    """The values that must never reach a log: every SecretStr setting, and a password in BOT_DATABASE_URL."""
    values = [
        value.get_secret_value()
        for name in Settings.model_fields
        if isinstance(value := getattr(settings, name), SecretStr)
    ]
    password = make_url(settings.database_url).password
    if password:
        values.append(str(password))
    # Longest first, so a secret that contains another is redacted whole.
    return sorted({value for value in values if value}, key=len, reverse=True)


class RedactSecrets(logging.Filter):
    """Replaces secret values in a record's message, its traceback and its extra fields, for every handler."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it when it formats the record
            return True
        # The message is formatted here, once, so secrets passed as arguments are caught too.
        record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call added with `extra=`, such as a handled message's platform, latency and outcome."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class TextFormatter(logging.Formatter):
    """The usual one-line text, with extra fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Strings quoted, so a message text with spaces or newlines stays on its line and readable.
        fields = [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
                  for key, value in extra_fields(record).items()]
        return " ".join([super().formatMessage(record), *fields])


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line, for log collectors: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **extra_fields(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Send every record (ours and the libraries') through one handler: BOT_LOG_LEVEL, BOT_LOG_FORMAT, secrets out."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(RedactSecrets(secret_values(settings)))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    logging.captureWarnings(True)  # warnings become records, so they are redacted and formatted too
