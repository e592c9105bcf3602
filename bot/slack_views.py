"""Block Kit for the Slack adapter: the settings modal, the App Home tab and the confirm button.

Each builder takes the core's answers as text; the views only arrange them.
"""

from __future__ import annotations

from typing import Any

from bot.slack_format import split_message

SETTINGS_CALLBACK = "gpt_settings"
CONFIRM_ACTION = "gpt_confirm"
HOME_RESET_ACTION = "gpt_home_reset"
SECTION_LIMIT = 3000  # Slack's limit for a section block's text

Block = dict[str, Any]


def _plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


def sections(text: str) -> list[Block]:
    """Section blocks that show text (escaped), split at Slack's section limit."""
    parts = split_message(text, SECTION_LIMIT)
    return [{"type": "section", "text": {"type": "mrkdwn", "text": part}} for part in parts]


# Modal inputs: block id (also the core's setting name in /settings NAME VALUE), label, element.
SETTINGS_INPUTS: tuple[tuple[str, str, Block], ...] = (
    ("persona", "Persona", {"type": "plain_text_input", "multiline": True}),
    ("temperature", "Temperature", {"type": "number_input", "is_decimal_allowed": True}),
    ("length", "Reply length in tokens", {"type": "number_input", "is_decimal_allowed": False}),
)


def settings_modal(current: str, *, metadata: str) -> Block:
    """The settings modal: the current settings as the core shows them, and an optional input per setting."""
    inputs = [
        {
            "type": "input",
            "block_id": name,
            "optional": True,
            "label": _plain(label),
            "hint": _plain("Leave empty to keep it as it is."),
            "element": {**element, "action_id": "value"},
        }
        for name, label, element in SETTINGS_INPUTS
    ]
    return {
        "type": "modal",
        "callback_id": SETTINGS_CALLBACK,
        "private_metadata": metadata,
        "title": _plain("Settings"),
        "submit": _plain("Save"),
        "close": _plain("Cancel"),
        "blocks": [*sections(current), {"type": "divider"}, *inputs],
    }


def settings_commands(values: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, str]]:
    """The core commands a submitted settings modal asks for, each with the block to show its error under."""
    commands = []
    for name, _, _ in SETTINGS_INPUTS:
        value = (values.get(name, {}).get("value", {}).get("value") or "").strip()
        if value:
            commands.append((name, f"/settings {name} {value}"))
    return commands


def home_view(settings: str, usage: str, status: str = "") -> Block:
    """The App Home tab: the user's settings and usage as the core tells them, and a reset button."""
    blocks: list[Block] = [
        {"type": "header", "text": _plain("Your settings")},
        *sections(settings),
        {"type": "header", "text": _plain("Your usage")},
        *sections(usage),
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "action_id": HOME_RESET_ACTION,
                    "text": _plain("Start a new conversation"),
                }
            ],
        },
    ]
    return {"type": "home", "blocks": [*blocks, *sections(status)]}


def confirm_blocks(text: str, command: str) -> list[Block]:
    """The core's question and a button that sends its confirm command."""
    button = {
        "type": "button",
        "action_id": CONFIRM_ACTION,
        "style": "danger",
        "text": _plain("Confirm"),
        "value": command,
    }
    return [*sections(text), {"type": "actions", "elements": [button]}]
