"""A lone sequence's decoding step on CPU: each transformer block compiled into one kernel.

A step for one new token reads every weight once. Run layer by layer, it also makes a few
dozen library calls per block, each with its dispatch and its OpenMP threads' wake-up:
GPT-2 small's step made 49 compiled or library calls plus the attention's and layer
norms' small ops. torch.compile turns a whole block (layer norms, the four one-row
products, the key and value store, attention, GELU, residuals) into one C++ function
with one OpenMP region. Measured side by side on this 2-vCPU machine, same tokens: a
GPT-2-small-sized step 22.5-28.4 -> 16.3-21.8 ms, the shipped model's 1.8 -> 0.9 ms
(which does not use them: see inference_weights.ROW_KERNEL_MIN_BYTES).
"""

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from model.gpt import GPT, Block, KVCache

if TYPE_CHECKING:
    from model.kv_pool import RowKVCache

log = logging.getLogger(__name__)

BlockWeights = tuple[Tensor, ...]  # ln_1 w, b; c_attn w, b; attn c_proj w, b; ln_2 w, b; c_fc w, b; mlp c_proj w, b


def _row_dot(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (in,) times weight (out, in): one dot product per contiguous weight row, (out,)."""
    y = (x * weight).sum(-1)
    return y if bias is None else y + bias


def _block_row(x: Tensor, k: Tensor, v: Tensor, *weights: Tensor) -> Tensor:
    """Block.forward for one token of one sequence: x (C,) at position S-1, whose key and value
    it stores in the last of k, v (nh, S, hs), the sequence's cache up to and including it."""
    ln1_w, ln1_b, attn_w, attn_b, attn_proj_w, attn_proj_b, ln2_w, ln2_b, fc_w, fc_b, mlp_proj_w, mlp_proj_b = weights
    C = x.size(0)
    n_head, _, head_dim = k.shape
    q, k[:, -1], v[:, -1] = (
        t.view(n_head, head_dim) for t in _row_dot(F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w, attn_b).split(C)
    )
    scores = (k * q.unsqueeze(1)).sum(-1) / math.sqrt(head_dim)  # (nh, S)
    y = (torch.softmax(scores, dim=-1).unsqueeze(-1) * v).sum(1).view(C)  # heads re-assembled
    x = x + _row_dot(y, attn_proj_w, attn_proj_b)
    h = F.gelu(_row_dot(F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b), approximate="tanh")  # as MLP
    return x + _row_dot(h, mlp_proj_w, mlp_proj_b)


def _head_row(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The LM head (or any Linear) for one row, x (1, in): (1, out)."""
    return _row_dot(x[0], weight, bias).unsqueeze(0)


class RowSteps(NamedTuple):
    block: Callable[..., Tensor]  # as _block_row
    head: Callable[[Tensor, Tensor, Tensor | None], Tensor]  # as _head_row


@functools.cache
def compiled_steps() -> RowSteps:
    """torch.compile's wrappers of the steps, made at first use: importing the compiler costs
    a process about 110 MiB. Each compiles at its first call (see use_row_steps)."""
    return RowSteps(torch.compile(_block_row), torch.compile(_head_row))


class RowStepBlock(nn.Module):
    """A Block whose one-token steps of one sequence with at least two positions cached run
    the compiled _block_row; everything else (prefill, batches) runs the Block itself."""

    def __init__(self, block: Block, step: Callable[..., Tensor]) -> None:
        super().__init__()
        self.block = block
        self.step = step  # compiled _block_row
        self.layer = block.attn.layer
        attn, mlp = block.attn, block.mlp
        modules = (block.ln_1, attn.c_attn, attn.c_proj, block.ln_2, mlp.c_fc, mlp.c_proj)
        # plain tensors over the parameters' memory, zeros for absent biases: one kernel for either
        weights: list[Tensor] = []
        for m in modules:
            weight = m.weight.detach()
            bias = torch.zeros(weight.size(0), dtype=weight.dtype, device=weight.device) if m.bias is None else m.bias
            weights += [weight, bias.detach()]
        self._weights: BlockWeights = tuple(weights)

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int) -> Tensor:
        if kv_cache is not None and start_pos > 1 and x.shape[:2] == (1, 1):
            return self._step(x, kv_cache.k[self.layer][0], kv_cache.v[self.layer][0], start_pos)
        return self.block(x, kv_cache, start_pos)

    def decode_rows(self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor) -> Tensor:
        own = mask.size(-1) - 1  # one row: its token's position, and the mask hides nothing
        if x.size(0) == 1 and own > 1:
            return self._step(x, cache.k[self.layer, 0], cache.v[self.layer, 0], own)
        return self.block.decode_rows(x, cache, pos, mask)

    def _step(self, x: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
        """x (1, 1, C) at position pos of k, v (nh, block_size, hs), after the positions before it."""
        k, v = _alias(k[:, : pos + 1]), _alias(v[:, : pos + 1])
        # the positions are the one size that changes from step to step: one kernel for all
        torch._dynamo.mark_dynamic(k, 1)
        torch._dynamo.mark_dynamic(v, 1)
        return self.step(x.view(-1), k, v, *self._weights).view(x.shape)


def _alias(t: Tensor) -> Tensor:
    """t as a tensor of its own over the same memory. Given a view, dynamo would also guard the
    sizes of the tensor it views, which differ between callers (a batch's pool, a lone
    sequence's cache): each would compile the step again."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def use_row_steps(model: GPT) -> Callable[[Tensor, Tensor, Tensor | None], Tensor] | None:
    """Put RowStepBlocks in model's place of its blocks and compile their step for its shapes now,
    not at a first reply; the one-row product for its LM head. None, and model unchanged,
    where this machine cannot compile (no C++ compiler, say): the layers' own code gives
    the same results, slower.

    Compiling takes a few seconds the first time, about one with torch's on-disk cache.
    Kernels for fixed shapes are the fastest; a second model in the process with other
    shapes makes those sizes dynamic (dynamo's automatic dynamic shapes), so compiles stay
    far from dynamo's recompile limit, past which it would run the steps eagerly.
    """
    steps = compiled_steps()
    blocks = [RowStepBlock(block, steps.block) for block in model.transformer.h]
    config, weight = model.config, model.transformer.wte.weight
    cache = KVCache(config, 1, weight.device, weight.dtype)
    try:
        with torch.inference_mode():  # as the engine runs
            x = torch.zeros(1, 1, config.n_embd, dtype=weight.dtype, device=weight.device)
            for start_pos in (2, 3):  # 1 or 2 positions: sizes dynamo specializes
                blocks[0](x, cache, start_pos)
            steps.head(x[0], model.lm_head.weight.detach(), None)
    except Exception as exc:
        log.warning("the one-row kernels could not be compiled (%s); layers use their own code", exc)
        return None
    model.transformer.h = nn.ModuleList(blocks)
    return steps.head
