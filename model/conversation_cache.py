"""Keys and values of finished turns, kept per conversation so its next turn prefills only new tokens."""

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class CachedTurn:
    ids: tuple[int, ...]  # the tokens at positions 0 .. len-1 whose keys and values kv holds
    kv: Tensor  # (2, n_layer, nh, len(ids), hs), as RowKVCache.read_row gives

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class ConversationCache:
    """Least-recently-used store of CachedTurn by conversation key, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[str, CachedTurn] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> CachedTurn | None:
        """Remove and return the entry of key; the running turn puts its own back when it ends."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def put(self, key: str, entry: CachedTurn) -> None:
        """Store entry as the most recent, evicting the least recent ones until it fits."""
        self.take(key)
        if entry.nbytes > self.max_bytes:
            return
        while self.nbytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of a and b."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
