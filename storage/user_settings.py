"""Per-user preferences: a user's overrides in user_settings, over the admin's defaults from Settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import DISPLAY_NAME_LENGTH, UserSettings, utcnow
from storage.repository import dialect_insert, strip_nul

if TYPE_CHECKING:
    from bot.config import Settings

PreferenceValue = str | float | int

# The name a user types for each preference, and the column that stores it.
PREFERENCE_COLUMNS = {
    "persona": "persona",
    "temperature": "temperature",
    "length": "max_reply_tokens",
    "name": "display_name_override",
}
PERSONA_LENGTH = 2000
MAX_REPLY_TOKENS = 4096


@dataclass(frozen=True)
class Preferences:
    """What the bot uses for one user: their own choices, else the admin's defaults."""

    persona: str
    temperature: float
    max_reply_tokens: int
    display_name: str | None  # None: the name the platform gives


def _check_text(name: str, value: PreferenceValue, longest: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text")
    text = strip_nul(value).strip()
    if not text or len(text) > longest:
        raise ValueError(f"{name} must be 1 to {longest} characters long")
    return text


def _check_number(name: str, value: PreferenceValue, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number from {low:g} to {high:g}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low:g} to {high:g}; got {value:g}")
    return value


def checked_preference(name: str, value: PreferenceValue) -> PreferenceValue:
    """`value` cleaned up for storing as preference `name`.

    Raises ValueError with a message for the user if it does not fit.
    """
    if name == "persona":
        return _check_text(name, value, PERSONA_LENGTH)
    if name == "name":
        return _check_text(name, value, DISPLAY_NAME_LENGTH)
    if name == "temperature":
        return float(_check_number(name, value, 0.0, 2.0))
    if name == "length":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("length must be a whole number of tokens")
        return int(_check_number(name, value, 1, MAX_REPLY_TOKENS))
    raise _unknown(name)


def _unknown(name: str) -> ValueError:
    return ValueError(f"there is no setting {name!r}; choose one of {', '.join(PREFERENCE_COLUMNS)}")


def parse_preference(name: str, text: str) -> PreferenceValue:
    """The value a user typed for preference `name` (e.g. '0.5' for temperature), checked.

    Raises ValueError with a message for the user.
    """
    if name in ("temperature", "length"):
        try:
            number: float = float(text.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number; got {text.strip()!r}") from None
        return checked_preference(name, number)
    return checked_preference(name, text)


async def get_user_settings(session: AsyncSession, *, user_id: int) -> UserSettings | None:
    """The user's stored overrides, or None when they never set any."""
    return await session.get(UserSettings, user_id, populate_existing=True)


async def set_preference(
    session: AsyncSession, *, user_id: int, name: str, value: PreferenceValue | None
) -> UserSettings:
    """Set one preference by its user-facing name; None puts it back to the default. The caller commits.

    An upsert, so two first changes at once both land. Raises ValueError (with a
    message for the user) for an unknown name or a value out of range.
    """
    if name not in PREFERENCE_COLUMNS:
        raise _unknown(name)
    stored = None if value is None else checked_preference(name, value)
    column, now = PREFERENCE_COLUMNS[name], utcnow()
    await session.execute(
        dialect_insert(session, UserSettings)
        .values({"user_id": user_id, column: stored, "updated_at": now})
        .on_conflict_do_update(index_elements=["user_id"], set_={column: stored, "updated_at": now})
    )
    row = await get_user_settings(session, user_id=user_id)
    assert row is not None, "the upsert wrote the row"
    return row


async def reset_preferences(session: AsyncSession, *, user_id: int) -> None:
    """Put every preference of the user back to the default. The caller commits."""
    await session.execute(delete(UserSettings).where(UserSettings.user_id == user_id))


def resolve_preferences(row: UserSettings | None, defaults: Settings) -> Preferences:
    """The user's overrides over the defaults; a reply length is capped at the admin's BOT_MAX_REPLY_TOKENS."""
    persona = row.persona if row and row.persona is not None else defaults.persona
    temperature = row.temperature if row and row.temperature is not None else defaults.temperature
    length = row.max_reply_tokens if row and row.max_reply_tokens is not None else defaults.max_reply_tokens
    return Preferences(
        persona=persona,
        temperature=temperature,
        max_reply_tokens=min(length, defaults.max_reply_tokens),
        display_name=row.display_name_override if row else None,
    )


async def preferences_for(session: AsyncSession, *, user_id: int, defaults: Settings) -> Preferences:
    """The preferences the bot uses for the user."""
    return resolve_preferences(await get_user_settings(session, user_id=user_id), defaults)
