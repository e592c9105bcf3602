"""The GPT network: embeddings, positional encoding, pre-LN transformer blocks, tied LM head.

Parameter names follow GPT-2 / nanoGPT (transformer.wte, transformer.h.0.attn.c_attn, ...),
so importing Hugging Face GPT-2 weights is a rename plus a transpose of the Conv1D weights.
"""

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.config import GPTConfig

if TYPE_CHECKING:
    from model.kv_pool import RowKVCache


class KVCache:
    """Pre-allocated keys and values for every layer, so decoding never concatenates tensors."""

    def __init__(
        self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at [start_pos, start_pos+T); return views of [0, start_pos+T)."""
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    @classmethod
    def over(cls, k: list[Tensor], v: list[Tensor]) -> "KVCache":
        """A cache over existing per-layer tensors (B, nh, block_size, hs), e.g. rows of a pool."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which KV-cache slot this attention uses
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k, v for all heads in one matmul, as GPT-2's c_attn
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, nh, T, hs) of x (B, T, C)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        return q, k, v

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int) -> Tensor:
        B, T, C = x.size()
        q, k, v = self._heads(x)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)  # (B, nh, S, hs), S = start_pos+T
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if T == S:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:
            # one new token attends to everything before it: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # T new tokens after start_pos cached ones; is_causal would align the mask top-left,
            # so build it: query i (absolute position start_pos+i) sees keys 0 .. start_pos+i
            rows = torch.arange(start_pos, S, device=x.device).unsqueeze(1)  # (T, 1)
            mask = torch.arange(S, device=x.device).unsqueeze(0) <= rows  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode_rows(self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor) -> Tensor:
        """One new token per sequence, x (B, 1, C): row b of cache is sequence b, its token at pos[b].

        mask (B, 1, 1, S), added to the scores, hides each row's positions after its own (-inf);
        S is the longest row + 1.
        """
        B, T, C = x.size()
        q, k, v = self._heads(x)  # (B, nh, 1, hs)
        k, v = cache.write_rows(self.layer, pos, k, v, mask.size(-1))  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, 1, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))

    def decode_rows(self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor) -> Tensor:
        """forward for one new token per row of a batch of sequences (see the attention's)."""
        x = x + self.attn.decode_rows(self.ln_1(x), cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position vectors (Vaswani et al.); a buffer, so nothing to learn or save."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        pos = torch.arange(config.block_size).unsqueeze(1)  # (block_size, 1)
        freq = torch.exp(torch.arange(0, config.n_embd, 2) * (-math.log(10000.0) / config.n_embd))
        table = torch.zeros(config.block_size, config.n_embd)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq)
        self.register_buffer("table", table, persistent=False)  # (block_size, C)

    def forward(self, pos: Tensor) -> Tensor:
        return self.table[pos]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        if config.pos_encoding == "learned":
            wpe: nn.Module = nn.Embedding(config.block_size, config.n_embd)
        else:
            wpe = SinusoidalPositions(config)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=wpe,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream
        # does not grow with depth (two residual additions per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding / LM head counted once."""
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(
        self,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for block_size positions, on the model's device and dtype by default."""
        weight = self.transformer.wte.weight
        return KVCache(
            self.config,
            batch_size,
            torch.device(device) if device is not None else weight.device,
            dtype if dtype is not None else weight.dtype,
        )

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for idx (B, T) at positions [start_pos, start_pos+T).

        With targets (B, T), also the mean cross-entropy loss; target -100 is ignored.
        With kv_cache, this call's keys and values are stored and earlier ones attended to.
        """
        x = self._trunk(idx, kv_cache, start_pos)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def forward_last(self, idx: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Logits (B, vocab) of the last position only, as forward's [:, -1] without the LM head
        on every other position (prefill)."""
        return self.lm_head(self._trunk(idx, kv_cache, start_pos)[:, -1])

    def decode_rows(self, tokens: Tensor, pos: Tensor, cache: "RowKVCache") -> Tensor:
        """Logits (B, vocab) after one new token for each of B sequences at once.

        tokens (B,) sit at positions pos (B,); row b of cache holds sequence b, whose keys and
        values at positions 0 .. pos[b]-1 are stored. Linear layers run on the whole batch;
        attention sees each row's own positions only, so rows never mix.
        """
        B = tokens.size(0)
        span = int(pos.max()) + 1  # positions the longest row attends to
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)  # (B, C)
        # additive mask, built once for all layers: -inf on the positions after each row's own
        after = torch.arange(span, device=tokens.device).unsqueeze(0) > pos.unsqueeze(1)  # (B, S)
        mask = torch.zeros(B, 1, 1, span, device=x.device, dtype=x.dtype)
        mask.masked_fill_(after.view(B, 1, 1, span), float("-inf"))  # (B, 1, 1, S)
        x = x.unsqueeze(1)  # (B, 1, C)
        for block in self.transformer.h:
            x = block.decode_rows(x, cache, pos, mask)
        return self.lm_head(self.transformer.ln_f(x[:, 0]))  # (B, vocab)

    def _trunk(self, idx: Tensor, kv_cache: KVCache | None, start_pos: int) -> Tensor:
        """Final-layer-normed hidden states (B, T, C) for idx (B, T) at [start_pos, start_pos+T)."""
        B, T = idx.size()
        if start_pos < 0 or start_pos + T > self.config.block_size:
            raise ValueError(
                f"positions [{start_pos}, {start_pos + T}) do not fit "
                f"block_size {self.config.block_size}"
            )
        if start_pos > 0 and kv_cache is None:
            raise ValueError("start_pos > 0 needs the kv_cache holding the earlier positions")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, kv_cache, start_pos)
        return self.transformer.ln_f(x)
