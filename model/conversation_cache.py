"""Keys and values of finished turns, kept per conversation so its next turn prefills only new tokens."""

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class CachedTurn:
    ids: tuple[int, ...]  # the tokens at positions 0 .. len-1 whose keys and values kv holds
    kv: Tensor  # (2, n_layer, nh, len(ids), hs) in the pool's dtype, from RowKVCache.read_row; may view a larger buffer

    @property
    def nbytes(self) -> int:
        """The bytes of the whole buffer kv lies in."""
        return self.kv.untyped_storage().nbytes()


class ConversationCache:
    """Least-recently-used store of CachedTurn by conversation key, bounded by bytes.

    Within the same bound it keeps the buffers of entries that have left (taken and copied
    into a batch row, or replaced) and hands them out again through buffer(): the page
    faults of a fresh buffer of tens of MB cost far more than the copy into it (GPT-2 small's
    667 positions, 49 MB: 15 ms, 60 beside the model's work, against 1.5 ms; measured).
    """

    def __init__(self, max_bytes: int, max_spares: int = 8) -> None:
        self.max_bytes = max_bytes
        self.max_spares = max_spares  # the largest kept: conversations grow, and so do their turns
        self.nbytes = 0  # of the entries
        self.spare_bytes = 0  # of the buffers kept for reuse
        self._entries: OrderedDict[str, CachedTurn] = OrderedDict()  # oldest first
        self._spares: list[Tensor] = []  # flat buffers, smallest first

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> CachedTurn | None:
        """Remove and return the entry of key; the running turn puts its own back when it ends."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def put(self, key: str, entry: CachedTurn) -> None:
        """Store entry as the most recent, dropping spare buffers, then the least recent entries, until it fits."""
        replaced = self.take(key)
        if replaced is not None:
            self.release(replaced)
        if entry.nbytes > self.max_bytes:
            return
        while self.nbytes + self.spare_bytes + entry.nbytes > self.max_bytes and self._spares:
            self.spare_bytes -= self._spares.pop().nbytes  # the largest first
        while self.nbytes + entry.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    def buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of at least numel elements for a new entry: the smallest spare one that
        fits, else a new one with up to an eighth more room, so that it fits a later turn too."""
        for i, spare in enumerate(self._spares):
            if spare.numel() >= numel and spare.dtype == dtype and spare.device == device:
                self.spare_bytes -= spare.nbytes
                return self._spares.pop(i)
        step = 1 << max(0, numel.bit_length() - 4)  # 1/16 to 1/8 of numel
        return torch.empty(-(-numel // step) * step, dtype=dtype, device=device)

    def release(self, entry: CachedTurn) -> None:
        """Keep the buffer of an entry that has left (its keys and values copied out) for buffer(),
        if it fits the bound beside the entries and the other spares; at most max_spares are kept."""
        spare = entry.kv.new_empty(0).set_(entry.kv.untyped_storage())  # flat, over the whole buffer
        if self.nbytes + self.spare_bytes + spare.nbytes <= self.max_bytes:
            bisect.insort(self._spares, spare, key=Tensor.numel)
            self.spare_bytes += spare.nbytes
            if len(self._spares) > self.max_spares:
                self.spare_bytes -= self._spares.pop(0).nbytes


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of a and b."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
