"""The Discord adapter's controls: the /settings menus, buttons and forms, and the confirm button.

Every control turns into the text of a core command ("/settings temperature 0.7",
"/forget confirm") sent as the person who used it. Their custom ids are fixed or
carry what they need, so they keep working on old messages after a restart.
"""

from __future__ import annotations

import re
from typing import Protocol, cast

import discord

TEMPERATURES = (
    ("0", "0 · always the likeliest words"),
    ("0.4", "0.4 · predictable"),
    ("0.8", "0.8 · balanced"),
    ("1.2", "1.2 · surprising"),
    ("2", "2 · wild"),
)


class ControlHost(Protocol):
    """What the controls need from the client (interaction.client): running a command for a control."""

    async def run_control(self, interaction: discord.Interaction, text: str, *, finished: bool) -> None:
        """Send text to the core as the person who used the control and show the answer on its message."""


def _host(interaction: discord.Interaction) -> ControlHost:
    return cast(ControlHost, interaction.client)


def reply_lengths(longest: int) -> list[int]:
    """Reply lengths in tokens to pick from, up to the admin's longest."""
    return sorted({max(1, longest * share // 8) for share in (1, 2, 4, 8)})


class SettingsView(discord.ui.View):
    """The controls under the /settings answer: temperature and reply length menus, persona and name forms."""

    def __init__(self, longest_reply: int) -> None:
        super().__init__(timeout=None)
        self.temperature.options = [discord.SelectOption(label=label, value=value) for value, label in TEMPERATURES]
        self.length.options = [
            discord.SelectOption(label=f"{n} tokens", value=str(n)) for n in reply_lengths(longest_reply)
        ]

    @discord.ui.select(custom_id="gptbot:settings:temperature", placeholder="Temperature…")
    async def temperature(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await _host(interaction).run_control(interaction, f"/settings temperature {select.values[0]}", finished=False)

    @discord.ui.select(custom_id="gptbot:settings:length", placeholder="Longest reply…")
    async def length(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
        await _host(interaction).run_control(interaction, f"/settings length {select.values[0]}", finished=False)

    @discord.ui.button(label="Persona…", custom_id="gptbot:settings:persona")
    async def persona(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(SettingForm("persona", "Who the bot is when it talks to you", long=True))

    @discord.ui.button(label="Name…", custom_id="gptbot:settings:name")
    async def name(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(SettingForm("name", "What the bot calls you"))


class SettingForm(discord.ui.Modal):
    """A one-field form for a text setting; "default" undoes the person's own choice."""

    def __init__(self, setting: str, label: str, *, long: bool = False) -> None:
        super().__init__(title=f"Your {setting}", custom_id=f"gptbot:settings:{setting}:form")
        self.setting = setting
        self.value = discord.ui.TextInput(
            label=label,
            custom_id="value",
            style=discord.TextStyle.paragraph if long else discord.TextStyle.short,
            placeholder='"default" gives back the usual one',
        )
        self.add_item(self.value)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        text = f"/settings {self.setting} {self.value.value}"
        await _host(interaction).run_control(interaction, text, finished=False)


class ConfirmButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"gptbot:confirm:(?P<user>\d+):(?P<command>.+)"
):
    """Sends the core's confirm command (e.g. "/forget confirm"), for the person who was asked only."""

    def __init__(self, user_id: int, command: str) -> None:
        super().__init__(
            discord.ui.Button(
                label="Confirm", style=discord.ButtonStyle.danger, custom_id=f"gptbot:confirm:{user_id}:{command}"
            )
        )
        self.user_id = user_id
        self.command = command

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> ConfirmButton:
        return cls(int(match["user"]), match["command"])

    async def callback(self, interaction: discord.Interaction) -> None:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("This button is for the person who asked.", ephemeral=True)
            return
        await _host(interaction).run_control(interaction, self.command, finished=True)


def confirm_view(user_id: int, command: str) -> discord.ui.View:
    """A view holding one confirm button."""
    view = discord.ui.View(timeout=None)
    view.add_item(ConfirmButton(user_id, command))
    return view
