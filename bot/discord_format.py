"""Discord's 2,000-character message limit: long text split on paragraph, line, sentence or code-block boundaries."""

from __future__ import annotations

import re

LIMIT = 2000
CLOSE_FENCE = "\n```"
_FENCE_LINE = re.compile(r"^```.*$", re.MULTILINE)
# Boundaries outside code blocks, best first; a kind with several separators takes the latest of them.
_BOUNDARIES = (("\n\n",), ("\n",), (". ", "! ", "? "), (" ",))


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """text as messages of at most `limit` characters, in order; whitespace at the cuts is dropped.

    Each cut is the latest boundary of the best kind found in the second half of the
    allowed length. A cut inside a code block closes the block and reopens it, with
    its language, in the next message, so both halves still render as code. A cut
    depends only on the text up to the limit, so while a reply grows its earlier
    messages keep their text.
    """
    chunks = []
    rest = text.strip()
    while len(rest) > limit:
        cut, fence = _cut(rest, limit)
        head, tail = rest[:cut].rstrip(), rest[cut:]
        if fence is None:
            chunks.append(head)
            rest = tail.lstrip()
        else:
            chunks.append(head + CLOSE_FENCE)
            rest = fence + "\n" + tail.lstrip("\n")
    if rest:
        chunks.append(rest)
    return chunks


def _cut(text: str, limit: int) -> tuple[int, str | None]:
    """Where to cut text, and the fence line to reopen when the cut falls inside a code block."""
    room = limit - len(CLOSE_FENCE)  # a cut inside code adds the closing fence to the head
    window = text[:room]
    fences = [(m.start(), m.group()) for m in _FENCE_LINE.finditer(window)]

    def open_fence(at: int) -> str | None:
        """The fence line of the code block that position `at` lies in, if any."""
        before = [line for start, line in fences if start < at]
        return before[-1] if len(before) % 2 else None

    floor = limit // 2  # never cut so early that messages become tiny
    for kind in _BOUNDARIES:
        best = max((_last_outside(window, sep, floor, open_fence) for sep in kind), default=None)
        if best:
            return best, None
    inside = _last_inside(window, floor, open_fence)
    if inside:
        return inside, open_fence(inside)
    return room, open_fence(room)


def _last_outside(window: str, sep: str, floor: int, open_fence) -> int:
    """The latest position after sep, at or beyond floor and outside code blocks; 0 if none."""
    end = len(window)
    while (found := window.rfind(sep, 0, end)) >= 0 and found + len(sep) >= floor:
        if open_fence(found + len(sep)) is None:
            return found + len(sep)
        end = found
    return 0


def _last_inside(window: str, floor: int, open_fence) -> int:
    """The latest line start inside a code block at or beyond floor; 0 if none."""
    end = len(window)
    while (found := window.rfind("\n", 0, end)) >= 0 and found + 1 >= floor:
        if open_fence(found + 1) is not None:
            return found + 1
        end = found
    return 0
