"""The Discord slash commands: each sends the core command of the same name, as text, through `run`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import discord
from discord import app_commands

from bot.discord_views import SettingsView

# Commands without options: name -> description.
SIMPLE_COMMANDS = {
    "reset": "Start a new conversation here",
    "unlink": "Separate this account from the ones linked to it",
    "history": "Your recent messages (only you see them)",
    "export": "All your data, as a JSON file (only you see it)",
    "forget": "Delete all your messages and settings (asks first)",
    "usage": "Tokens you used today, and your daily quota",
    "help": "What the bot can do",
}
# Discord shows the admin commands to server administrators only; the core obeys only BOT_ADMINS.
ADMIN_ONLY = discord.Permissions(administrator=True)


class RunCommand(Protocol):
    """DiscordBot.run_command: answer an interaction with the core's reply to text."""

    def __call__(
        self, interaction: discord.Interaction, text: str, *, public: bool = False, view: discord.ui.View | None = None
    ) -> Awaitable[None]: ...


def add_commands(tree: app_commands.CommandTree, run: RunCommand, *, longest_reply: int) -> None:
    """Register every command on tree; longest_reply is the admin's limit that /settings offers up to."""

    @tree.command(description="Talk with the bot")
    @app_commands.describe(prompt="What you want to say")
    async def chat(interaction: discord.Interaction, prompt: str) -> None:
        await run(interaction, prompt, public=True)

    @tree.command(description="Your settings: persona, temperature, reply length, name")
    async def settings(interaction: discord.Interaction) -> None:
        await run(interaction, "/settings", view=SettingsView(longest_reply))

    @tree.command(description="Link another account (Discord, Slack, terminal) to this one")
    @app_commands.describe(code="The code /link gave you on the other account; leave out to get a code")
    async def link(interaction: discord.Interaction, code: str | None = None) -> None:
        await run(interaction, f"/link {code}" if code else "/link")

    for name, description in SIMPLE_COMMANDS.items():
        tree.add_command(app_commands.Command(name=name, description=description, callback=_sends(run, f"/{name}")))

    @tree.command(description="Admin: users, conversations, messages and tokens today")
    @app_commands.default_permissions(ADMIN_ONLY)
    async def stats(interaction: discord.Interaction) -> None:
        await run(interaction, "/stats")

    @tree.command(description="Admin: keep a user out")
    @app_commands.default_permissions(ADMIN_ONLY)
    @app_commands.describe(user="platform:user, e.g. discord:1234 or slack:T01ABC/U02DEF")
    async def ban(interaction: discord.Interaction, user: str) -> None:
        await run(interaction, f"/ban {user}")

    @tree.command(description="Admin: let a banned user back in")
    @app_commands.default_permissions(ADMIN_ONLY)
    @app_commands.describe(user="platform:user, as for /ban")
    async def unban(interaction: discord.Interaction, user: str) -> None:
        await run(interaction, f"/unban {user}")


def _sends(run: RunCommand, text: str) -> Callable[[discord.Interaction], Awaitable[None]]:
    """The callback of a command without options: it always sends text."""

    async def callback(interaction: discord.Interaction) -> None:
        await run(interaction, text)

    return callback
