"""Platform-neutral commands: parsed once here, whatever platform the text came from."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.access import Access, admitted_user, quota_for, set_ban
from bot.accounts import Account
from bot.config import Settings
from bot.identity import AccountLinking
from bot.messages import Attachment, ErrorKind, Incoming, Reply
from storage import repository
from storage.models import User, utcnow
from storage.privacy import export_user_data, forget_user_data, recent_history
from storage.usage import stats, usage_by_day
from storage.user_settings import PREFERENCE_COLUMNS, parse_preference, preferences_for, set_preference

HELP_TEXT = """Talk to me in plain text and I answer. Commands:
  /help                    this text
  /reset                   start a new conversation here
  /settings                show your settings
  /settings persona TEXT   who I am when I talk to you ("/settings persona default" undoes it)
  /settings temperature N  0 to 2: lower is more predictable, higher more surprising
  /settings length N       the longest reply, in tokens
  /settings name NAME      what I call you
  /link                    get a code to link another account (Discord, Slack, terminal) to this one
  /link CODE               link this account to the one that made CODE
  /unlink                  separate this account again
  /history                 your recent messages
  /export                  all your data, as JSON
  /forget                  delete all your messages and settings (asks first)
  /usage                   tokens you used today, and your daily quota"""

ADMIN_HELP = """Admin commands:
  /stats                   users, conversations, messages, tokens today
  /ban PLATFORM:USER       keep a user out (e.g. /ban discord:1234, /ban slack:T01ABC/U02DEF)
  /unban PLATFORM:USER     let them back in"""

HISTORY_LIMIT = 20
FORGET_CONFIRM = "/forget confirm"


@dataclass(frozen=True)
class Command:
    name: str
    args: str


def parse_command(text: str) -> Command | None:
    """The command in text ("/reset", "/settings temperature 0.5"), or None for chat text.

    A lone "/" followed by a space or nothing is chat, not a command.
    """
    if not text.startswith("/") or len(text) < 2 or text[1].isspace():
        return None
    name, _, args = text[1:].partition(" ")
    return Command(name=name.lower(), args=args.strip())


Handler = Callable[[AsyncSession, User, Incoming, str], Awaitable[Reply]]


class CommandHandler:
    """Runs the commands for every platform; each answer is a Reply the adapter shows as it is."""

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        access: Access,
        linking: AccountLinking,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.access = access
        self.linking = linking
        self._handlers: dict[str, Handler] = {
            "reset": self._reset,
            "settings": self._settings,
            "link": self._link,
            "unlink": self._unlink,
            "history": self._history,
            "export": self._export,
            "forget": self._forget,
            "usage": self._usage,
            "stats": self._stats,
            "ban": self._ban,
            "unban": self._unban,
        }

    async def run(self, command: Command, msg: Incoming) -> Reply:
        """Answer one command; unknown ones get the help text, never a model reply."""
        account = Account.of(msg)
        handler = self._handlers.get(command.name)
        if handler is None:
            return Reply.text(self._help(account), ephemeral=True)
        async with self.sessions() as session, session.begin():
            owner, decision = await admitted_user(session, access=self.access, msg=msg)
            if not decision.allowed:
                return Reply.text(decision.message, ephemeral=True, error=ErrorKind.REFUSED)
            return await handler(session, owner.user, msg, command.args)

    def _help(self, account: Account) -> str:
        return HELP_TEXT + ("\n" + ADMIN_HELP if self.access.is_admin(account) else "")

    async def _reset(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        await repository.start_new_conversation(
            session, user_id=user.id, platform=msg.platform, place=msg.place, is_dm=msg.is_dm
        )
        return Reply.text("Started a new conversation. I have forgotten what we said here before.")

    async def _settings(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        if args:
            name, _, value = args.partition(" ")
            name = name.lower()
            if name not in PREFERENCE_COLUMNS:
                return Reply.text(
                    f"There is no setting {name!r}. Settings: {', '.join(PREFERENCE_COLUMNS)}.",
                    ephemeral=True,
                    error=ErrorKind.INVALID,
                )
            if not value.strip():
                return Reply.text(f"Give a value: /settings {name} VALUE.", ephemeral=True, error=ErrorKind.INVALID)
            try:
                parsed = None if value.strip().lower() == "default" else parse_preference(name, value)
            except ValueError as exc:
                return Reply.text(f"Not changed: {exc}.", ephemeral=True, error=ErrorKind.INVALID)
            await set_preference(session, user_id=user.id, name=name, value=parsed)
        prefs = await preferences_for(session, user_id=user.id, defaults=self.settings)
        lines = [
            "Changed. Your settings now:" if args else "Your settings:",
            f"  persona      {prefs.persona}",
            f"  temperature  {prefs.temperature:g}",
            f"  length       {prefs.max_reply_tokens} tokens (at most {self.settings.max_reply_tokens})",
            f"  name         {prefs.display_name or msg.display_name}",
            "Change one with /settings NAME VALUE; VALUE 'default' undoes it.",
        ]
        return Reply.text("\n".join(lines), ephemeral=True)

    async def _link(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        account = Account.of(msg)
        if args:
            result = await self.linking.redeem(session, account=account, display_name=msg.display_name, code=args)
        else:
            result = await self.linking.create_code(session, account=account, display_name=msg.display_name)
        return Reply.text(result.message, ephemeral=True, error=None if result.ok else ErrorKind.INVALID)

    async def _unlink(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        result = await self.linking.unlink(session, account=Account.of(msg))
        return Reply.text(result.message, ephemeral=True, error=None if result.ok else ErrorKind.INVALID)

    async def _history(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        messages = await recent_history(session, user_id=user.id, limit=HISTORY_LIMIT)
        if not messages:
            return Reply.text("You have no stored messages.", ephemeral=True)
        lines = [f"Your last {len(messages)} messages:"]
        for m in messages:
            who = "you" if m.role == "user" else "bot"
            lines.append(f"[{m.created_at:%Y-%m-%d %H:%M}] {who}: {m.text}")
        return Reply.text("\n".join(lines), ephemeral=True)

    async def _export(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        data = await export_user_data(session, user_id=user.id)
        content = json.dumps(data, ensure_ascii=False, indent=2).encode()
        return Reply.text(
            f"All your data is in the attached file ({len(content):,} bytes of JSON).",
            ephemeral=True,
            attachment=Attachment(filename=f"my-data-{user.id}.json", content=content),
        )

    async def _forget(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        if args.lower() != "confirm":
            return Reply.text(
                "This deletes all your messages and settings, on every linked account, for good. "
                f"To go ahead, send {FORGET_CONFIRM}.",
                ephemeral=True,
                confirm_command=FORGET_CONFIRM,
            )
        deleted = await forget_user_data(session, user_id=user.id)
        return Reply.text(f"Done: I deleted {deleted:,} messages and your settings.", ephemeral=True)

    async def _usage(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        today = utcnow().date()
        quota = await quota_for(session, settings=self.settings, user_id=user.id, today=today)
        week = await usage_by_day(session, user_id=user.id, since=today - dt.timedelta(days=6))
        lines = [quota.message]
        if week:
            lines.append("Last 7 days: " + ", ".join(f"{day:%m-%d} {tokens:,}" for day, tokens in week))
        return Reply.text("\n".join(lines), ephemeral=True)

    async def _stats(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        if not self.access.is_admin(Account.of(msg)):
            return Reply.text("Only admins can see /stats.", ephemeral=True, error=ErrorKind.REFUSED)
        s = await stats(session, today=utcnow().date())
        return Reply.text(
            f"users {s.users:,} · conversations {s.conversations:,} · messages {s.messages:,} · "
            f"tokens today {s.tokens_today:,}",
            ephemeral=True,
        )

    async def _ban(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        return await self._set_ban(session, msg, args, banned=True)

    async def _unban(self, session: AsyncSession, user: User, msg: Incoming, args: str) -> Reply:
        return await self._set_ban(session, msg, args, banned=False)

    async def _set_ban(self, session: AsyncSession, msg: Incoming, args: str, *, banned: bool) -> Reply:
        if not args:
            verb = "ban" if banned else "unban"
            return Reply.text(f"Say who: /{verb} PLATFORM:USER.", ephemeral=True, error=ErrorKind.INVALID)
        text = await set_ban(session, access=self.access, actor=Account.of(msg), target=args, banned=banned)
        return Reply.text(text, ephemeral=True)
