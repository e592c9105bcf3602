"""Platform accounts, and the references to accounts, channels and workspaces that admins write in settings."""

from __future__ import annotations

from dataclasses import dataclass

from bot.messages import Incoming
from storage.models import PLATFORMS

ACCOUNT_FORM = "platform:id (e.g. discord:1234) or platform:workspace/id (e.g. slack:T01ABC/U02DEF)"
WORKSPACE_FORM = "platform:workspace (e.g. discord:1234 or slack:T01ABC)"


GLOBAL_USER_IDS = {"console", "discord"}


@dataclass(frozen=True)
class Account:
    """One platform account, keyed the way storage keys identities."""

    platform: str
    workspace_id: str  # "" where the platform has none
    user_id: str

    @classmethod
    def of(cls, msg: Incoming) -> Account:
        """The account that sent a message.

        Discord user ids are the same in every server and in DMs, so a Discord account
        has no workspace: one person is one user everywhere. Slack user ids belong to
        their workspace.
        """
        workspace = "" if msg.platform in GLOBAL_USER_IDS else msg.workspace_id
        return cls(platform=msg.platform, workspace_id=workspace, user_id=msg.user_id)

    def __str__(self) -> str:
        scope = f"{self.workspace_id}/" if self.workspace_id else ""
        return f"{self.platform}:{scope}{self.user_id}"


@dataclass(frozen=True)
class Ref:
    """A reference from settings: 'discord:1234' (in any workspace) or 'slack:T01ABC/U02DEF' (in one)."""

    platform: str
    workspace_id: str | None  # None: any workspace
    id: str

    def matches(self, platform: str, workspace_id: str, id: str) -> bool:
        """Whether this reference names the thing `id` of `platform` in `workspace_id`."""
        return (
            self.platform == platform
            and self.id == id
            and (self.workspace_id is None or self.workspace_id == workspace_id)
        )

    def __str__(self) -> str:
        scope = f"{self.workspace_id}/" if self.workspace_id is not None else ""
        return f"{self.platform}:{scope}{self.id}"


def _plain(part: str) -> bool:
    return bool(part) and not any(c.isspace() or c in ",/" for c in part)


def parse_ref(text: str, *, scoped: bool = True) -> Ref:
    """One reference; `scoped=False` refuses the workspace/id form (for workspace lists).

    Raises ValueError naming the entry and the expected form.
    """
    form = ACCOUNT_FORM if scoped else WORKSPACE_FORM
    platform, colon, rest = text.partition(":")
    if not colon:
        raise ValueError(f"{text!r} is not {form}")
    if platform not in PLATFORMS:
        raise ValueError(f"{text!r} names the unknown platform {platform!r}; use {', '.join(PLATFORMS)}")
    workspace, slash, id = rest.rpartition("/")
    if slash and (not scoped or not _plain(workspace)) or not _plain(id):
        raise ValueError(f"{text!r} is not {form}")
    return Ref(platform=platform, workspace_id=workspace if slash else None, id=id)


def parse_refs(text: str, *, scoped: bool = True) -> tuple[Ref, ...]:
    """A comma-separated list of references; blanks around entries and empty entries are ignored."""
    return tuple(parse_ref(entry.strip(), scoped=scoped) for entry in text.split(",") if entry.strip())
