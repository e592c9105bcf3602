"""A reply's text built token by token: UTF-8-safe pieces, cut before the first stop string."""

from collections.abc import Sequence

from model.generate import _find_stop, _held_back
from model.tokenizer import ChatTokenizer


class ReplyText:
    """The incremental form of generate.stream_text's text handling, for one request in a batch.

    A tail that could be the start of a stop string is held back until the next token
    settles it; the stop string itself is never given out.
    """

    def __init__(self, tokenizer: ChatTokenizer, stop_strings: Sequence[str]) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._stop_strings = tuple(stop_strings)
        self._pending = ""
        self.stopped = False  # a stop string was found; nothing more comes out

    def push(self, token: int) -> str:
        """The text this token makes safe to show ('' when none); sets stopped at a stop string."""
        self._pending += self._decoder.push(token)
        cut = _find_stop(self._pending, self._stop_strings)
        if cut is not None:
            self.stopped = True
            piece, self._pending = self._pending[:cut], ""
            return piece
        keep = _held_back(self._pending, self._stop_strings)
        split = len(self._pending) - keep
        piece, self._pending = self._pending[:split], self._pending[split:]
        return piece

    def finish(self) -> str:
        """The rest of the text when the reply ends without a stop string."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        cut = _find_stop(self._pending, self._stop_strings)
        piece, self._pending = self._pending[:cut], ""
        return piece
