"""Pre-allocated keys and values for the running batch: one row per sequence, each at its own length."""

import math
import mmap
from collections.abc import Callable

import torch
from torch import Tensor

from model.config import GPTConfig
from model.gpt import KVCache

Allocate = Callable[[int, torch.dtype, torch.device], Tensor]  # (numel, dtype, device) -> flat tensor

# What a pool may hold, an operator's choice: auto, the weights' dtype (float32 on CPU, as trained;
# bfloat16 on CUDA); float32; float16, half the memory and half the bytes a long context's attention
# reads, which cpu_kernels.c's decoding step converts in registers.
KV_PRECISIONS = ("auto", "float32", "float16")


def kv_dtype(setting: str, weights: torch.dtype) -> torch.dtype:
    """The pool's dtype for a KV_PRECISIONS setting, given the dtype the weights compute in."""
    if setting not in KV_PRECISIONS:
        raise ValueError(f"the key/value precision must be one of {KV_PRECISIONS}, not {setting!r}")
    return weights if setting == "auto" else getattr(torch, setting)


def _new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(numel, dtype=dtype, device=device)


def _zeros_on_demand(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Zeros; on CPU in an anonymous mapping, whose pages the OS commits as they are first written,
    so that the rows and positions no sequence has reached take no memory (GPT-2 small's pool of
    16 rows is 1.2 GB). torch.zeros writes every page at once."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    numel = math.prod(shape)
    pages = mmap.mmap(-1, max(1, numel * dtype.itemsize))  # the tensor keeps it alive
    return torch.frombuffer(pages, dtype=dtype, count=numel).view(shape)


class RowKVCache:
    """Keys and values (n_layer, rows, nkv, block_size, hs): one entry per key/value head, allocated once for the engine's life.

    Row b holds the sequence in batch slot b at positions 0 .. its length-1. A decoding step
    writes each row's new key at that row's own position (no torch.cat, no reallocation);
    attention reads the first S positions of every row and masks what lies past a row's end.
    The pool's dtype may be narrower than the model's (see KV_PRECISIONS): keys and values are
    rounded as they are written, and widened where attention reads them.
    """

    def __init__(self, config: GPTConfig, rows: int, device: torch.device, dtype: torch.dtype) -> None:
        assert config.n_kv_head is not None
        shape = (config.n_layer, rows, config.n_kv_head, config.block_size, config.head_dim)
        self.k = _zeros_on_demand(shape, device, dtype)
        self.v = _zeros_on_demand(shape, device, dtype)
        self._row_ids = torch.arange(rows, device=device)  # (rows,)

    @classmethod
    def _over(cls, k: Tensor, v: Tensor) -> "RowKVCache":
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        cache._row_ids = torch.arange(k.size(1), device=k.device)
        return cache

    def rows_view(self, start: int, count: int) -> "RowKVCache":
        """Rows start..start+count-1 as a pool of their own, for a decoding step of just those rows.

        Views, not copies: what a step writes there lands in this pool.
        """
        return RowKVCache._over(self.k[:, start : start + count], self.v[:, start : start + count])

    @property
    def rows(self) -> int:
        return self.k.size(1)

    def bytes_per_token(self) -> int:
        """Memory of one position's keys and values over all layers."""
        _, _, n_head, _, head_dim = self.k.shape
        return 2 * self.k.size(0) * n_head * head_dim * self.k.element_size()

    def write_rows(self, layer: int, pos: Tensor, k: Tensor, v: Tensor, span: int) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, 1, hs) of rows 0..B-1 at positions pos (B,), rounded to the pool's dtype;
        views (B, nkv, span, hs), in the pool's dtype."""
        B = k.size(0)
        rows = self._row_ids[:B]
        # advanced indices around a slice: the indexed result is (B, nkv, hs), as k[:, :, 0]
        self.k[layer][rows, :, pos] = k[:, :, 0].to(self.k.dtype)  # index_put casts nothing itself
        self.v[layer][rows, :, pos] = v[:, :, 0].to(self.v.dtype)
        return self.k[layer, :B, :, :span], self.v[layer, :B, :, :span]

    def row(self, r: int) -> KVCache:
        """Row r as a batch-of-one KVCache (views into this pool), for prefilling that sequence."""
        layers = range(self.k.size(0))
        return KVCache.over([self.k[i, r : r + 1] for i in layers], [self.v[i, r : r + 1] for i in layers])

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first length positions of row src into row dst."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read_row(self, r: int, length: int, buffer: Allocate = _new_buffer) -> Tensor:
        """A copy (2, n_layer, nkv, length, hs) of row r's first length positions, in the first
        elements of the flat tensor buffer(numel, dtype, device) gives."""
        n_layer, _, n_head, _, head_dim = self.k.shape
        shape = (2, n_layer, n_head, length, head_dim)
        numel = math.prod(shape)
        kv = buffer(numel, self.k.dtype, self.k.device)[:numel].view(shape)
        kv[0].copy_(self.k[:, r, :, :length])
        kv[1].copy_(self.v[:, r, :, :length])
        return kv

    def write_row(self, r: int, kv: Tensor, length: int) -> None:
        """Put the first length positions of kv (2, n_layer, nkv, >=length, hs), from read_row, into row r."""
        self.k[:, r, :, :length] = kv[0, :, :, :length]
        self.v[:, r, :, :length] = kv[1, :, :, :length]
