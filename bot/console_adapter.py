"""The terminal adapter: chat at a prompt, or one reply per input line when used in a pipe."""

from __future__ import annotations

import asyncio
import getpass
import threading
from pathlib import Path
import sys
from typing import TextIO

from bot.messages import Incoming
from bot.sessions import SessionManager

QUIT = {"/quit", "/exit"}


class ConsoleAdapter:
    """Reads the terminal's lines as messages from the local user and streams the replies back."""

    name = "console"

    def __init__(
        self,
        manager: SessionManager,
        *,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        user: str | None = None,
    ) -> None:
        self.manager = manager
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user = user or getpass.getuser()

    async def connected(self) -> bool:
        """The terminal is there as long as the bot runs."""
        return True

    @property
    def interactive(self) -> bool:
        return self.stdin.isatty() and self.stdout.isatty()

    async def run(self) -> None:
        """Answer lines until end of input or /quit."""
        interactive = self.interactive
        if interactive:
            self._write("Chatting with the bot. /help lists commands, /quit leaves.\n")
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        wanted = threading.Semaphore(0)
        # A daemon thread, not asyncio.to_thread: a blocked input() must not keep the process alive on exit.
        threading.Thread(target=self._read_lines, args=(loop, lines, wanted, interactive), daemon=True).start()
        while True:
            wanted.release()
            line = await lines.get()
            if line is None or line.strip().lower() in QUIT:
                return
            if interactive and not line.strip():
                continue
            await self._answer(line.rstrip("\r\n"), interactive)

    def _read_lines(
        self,
        loop: asyncio.AbstractEventLoop,
        lines: asyncio.Queue[str | None],
        wanted: threading.Semaphore,
        interactive: bool,
    ) -> None:
        """Read one line each time the chat asks for one, so the prompt appears after the reply."""
        while True:
            wanted.acquire()
            try:
                line: str | None = input("you> ") if interactive else (self.stdin.readline() or None)
            except EOFError:
                line = None
            loop.call_soon_threadsafe(lines.put_nowait, line)
            if line is None:
                return

    async def _answer(self, text: str, interactive: bool) -> None:
        incoming = Incoming(platform="console", user_id=self.user, display_name=self.user, text=text)
        reply = await self.manager.handle(incoming)
        if interactive:
            self._write("bot> ")
        async for piece in reply.pieces:
            # In a pipe each reply is exactly one line, so scripts can pair questions and answers.
            self._write(piece if interactive else piece.replace("\r", " ").replace("\n", " "))
        if reply.attachment is not None:
            path = Path.cwd() / reply.attachment.filename
            await asyncio.to_thread(path.write_bytes, reply.attachment.content)
            self._write(f" Saved to {path}.")
        self._write("\n")

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
