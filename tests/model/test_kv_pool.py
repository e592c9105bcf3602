"""The key/value pool: zeros that take memory only where sequences have reached."""

import sys
from pathlib import Path

import pytest
import torch

from model.config import GPTConfig
from model.kv_pool import RowKVCache

# 8 rows of 4 layers x 2 heads x 2,048 positions x 64: 8 MiB a row for keys and values together
CONFIG = GPTConfig(vocab_size=100, block_size=2048, n_layer=4, n_head=2, n_embd=128)
ROW_MIB = 2 * CONFIG.n_layer * CONFIG.n_head * CONFIG.block_size * CONFIG.head_dim * 4 / 2**20


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_cpu_pool_takes_memory_as_its_rows_are_written() -> None:
    before = resident_mib()
    pool = RowKVCache(CONFIG, 8, torch.device("cpu"), torch.float32)
    assert pool.k.shape == (4, 8, 2, 2048, 64) and pool.k.dtype == torch.float32
    assert resident_mib() - before < ROW_MIB  # 64 MiB of pool, almost none of it resident
    pool.k[:, :2] = 1.0
    pool.v[:, :2] = 2.0
    grown = resident_mib() - before
    assert 1.5 * ROW_MIB < grown < 3 * ROW_MIB  # two rows' worth
    assert pool.k[:, 2:].count_nonzero() == 0 and pool.v[:, 2:].count_nonzero() == 0  # zeros elsewhere
    assert pool.k[:, :2].eq(1.0).all() and pool.v[:, :2].eq(2.0).all()


def test_a_pool_in_bfloat16_starts_at_zero() -> None:
    pool = RowKVCache(CONFIG, 2, torch.device("cpu"), torch.bfloat16)
    assert pool.v.dtype == torch.bfloat16 and pool.v.count_nonzero() == 0
