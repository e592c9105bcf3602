"""The GPT network: embeddings, positional encoding, pre-norm transformer blocks, LM head.

Parameter names follow GPT-2 / nanoGPT (transformer.wte, transformer.h.0.attn.c_attn, ...),
so importing Hugging Face GPT-2 weights is a rename plus a transpose of the Conv1D weights.
The Llama family (SmolLM2, Qwen2.5, Llama 3.2, TinyLlama) is the same network with other
GPTConfig options: rotary positions, RMSNorm, SwiGLU, grouped-query attention, q/k/v biases
and a separate LM head. Their q, k and v weights are stored as one c_attn, as GPT-2's, and the
SwiGLU's gate and up weights as one c_fc, so a block runs the same four products either way.
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


Rope = tuple[Tensor, Tensor]  # cos, sin (..., hs/2) of the positions at hand


class KVCache:
    """Pre-allocated keys and values for every layer, so decoding never concatenates tensors.

    One entry per key/value head (n_kv_head), which grouped-query attention shares among
    n_head / n_kv_head query heads."""

    def __init__(
        self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        assert config.n_kv_head is not None
        shape = (batch_size, config.n_kv_head, config.block_size, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nkv, T, hs) at [start_pos, start_pos+T), cast to the cache's dtype; return
        views of [0, start_pos+T)."""
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    @classmethod
    def over(cls, k: list[Tensor], v: list[Tensor]) -> "KVCache":
        """A cache over existing per-layer tensors (B, nkv, block_size, hs), e.g. rows of a pool."""
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache


def rotate(x: Tensor, rope: Rope) -> Tensor:
    """Rotary positions on x (..., hs), the halves convention of Hugging Face's Llama: dimension i
    pairs with i + hs/2; cos, sin (..., hs/2) broadcast over x's heads."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_frequencies(config: GPTConfig) -> Tensor:
    """The rotary inverse frequencies (hs/2,), with Llama 3's long-context scaling where configured
    (the same arithmetic as transformers, so that positions rotate by the same float32 angles)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if config.rope_scaling != "llama3":
        return inv_freq
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_context
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryTable(nn.Module):
    """cos and sin of every position's rotary angles: (block_size, hs/2) each, a buffer."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        angles = torch.arange(config.block_size).float()[:, None] * rope_frequencies(config)  # (block_size, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: Tensor) -> Rope:
        return self.cos[pos], self.sin[pos]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        assert config.n_kv_head is not None and config.qkv_bias is not None
        self.layer = layer  # which KV-cache slot this attention uses
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.dropout = config.dropout
        # q, k, v for all heads in one matmul, as GPT-2's c_attn: n_head query heads, then
        # n_kv_head key heads and as many value heads
        width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, width, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, nh, T, hs), k, v (B, nkv, T, hs) of x (B, T, C), q and k rotated where rope is given."""
        B, T, C = x.size()
        hs, kv_width = self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        return q, k, v

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int, rope: Rope | None = None) -> Tensor:
        """rope: cos, sin (T, hs/2) of positions start_pos .. start_pos+T-1, for rotary models."""
        B, T, C = x.size()
        q, k, v = self._heads(x, rope)
        if kv_cache is not None:
            # stored in the cache's dtype (rounded where it is narrower), read back in q's
            k, v = kv_cache.update(self.layer, start_pos, k, v)  # (B, nkv, S, hs), S = start_pos+T
            k, v = k.to(q.dtype), v.to(q.dtype)
        S = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if T == S:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
        elif T == 1:
            # one new token attends to everything before it: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
        else:
            # T new tokens after start_pos cached ones; is_causal would align the mask top-left,
            # so build it: query i (absolute position start_pos+i) sees keys 0 .. start_pos+i
            rows = torch.arange(start_pos, S, device=x.device).unsqueeze(1)  # (T, 1)
            mask = torch.arange(S, device=x.device).unsqueeze(0) <= rows  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def decode_rows(
        self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor, rope: Rope | None = None
    ) -> Tensor:
        """One new token per sequence, x (B, 1, C): row b of cache is sequence b, its token at pos[b].

        mask (B, 1, 1, S), added to the scores, hides each row's positions after its own (-inf);
        S is the longest row + 1. rope: cos, sin (B, 1, 1, hs/2) of each row's position.
        """
        B, T, C = x.size()
        q, k, v = self._heads(x, rope)  # q (B, nh, 1, hs), k, v (B, nkv, 1, hs)
        k, v = cache.write_rows(self.layer, pos, k, v, mask.size(-1))  # (B, nkv, S, hs), the pool's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """GELU(x W1) W2 (GPT-2), or SwiGLU (Llama): c_fc gives the gate's and the up projection's
    outputs side by side, (silu(gate) * up) W2."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_inner is not None
        self.swiglu = config.mlp == "swiglu"
        fc_width = 2 * config.n_inner if self.swiglu else config.n_inner
        self.c_fc = nn.Linear(config.n_embd, fc_width, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None, start_pos: int, rope: Rope | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos, rope)
        return x + self.mlp(self.ln_2(x))

    def decode_rows(
        self, x: Tensor, cache: "RowKVCache", pos: Tensor, mask: Tensor, rope: Rope | None = None
    ) -> Tensor:
        """forward for one new token per row of a batch of sequences (see the attention's)."""
        x = x + self.attn.decode_rows(self.ln_1(x), cache, pos, mask, rope)
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
        parts: dict[str, nn.Module] = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            parts["wpe"] = SinusoidalPositions(config)
        self.transformer = nn.ModuleDict(
            dict(
                **parts,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
        # rotary models turn positions into angles inside attention: one table for every layer
        self.rotary = RotaryTable(config) if config.pos_encoding == "rope" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2

        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream
        # does not grow with depth (two residual additions per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @classmethod
    def from_state(cls, config: GPTConfig, state: dict[str, Tensor]) -> "GPT":
        """A GPT over state's tensors (the tied LM head included under its name), built without the
        random initialisation that loading would overwrite: a billion parameters load in seconds."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        model.loaded()
        return model

    def loaded(self) -> None:
        """After a GPT built on the meta device got its weights by assignment: the tied LM head tied
        again (assign gives each name its own Parameter), the computed buffers built off the meta device."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if self.rotary is not None:
            self.rotary = RotaryTable(self.config)
        if self.config.pos_encoding == "sinusoidal":
            self.transformer.wpe = SinusoidalPositions(self.config)

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

    @classmethod
    def params_of(cls, config: GPTConfig) -> int:
        """num_params of a GPT of config, without building one (an engine's packed weights count otherwise)."""
        with torch.device("meta"):
            return cls(config).num_params()

    def _embed(self, idx: Tensor, pos: Tensor) -> tuple[Tensor, Rope | None]:
        """Token (and absolute position) embeddings of idx at positions pos, and the rotary
        angles of pos for rotary models."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        return x, None if self.rotary is None else self.rotary(pos)

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
        x, rope = self._embed(tokens, pos)  # (B, C); cos, sin (B, hs/2)
        if rope is not None:
            rope = (rope[0].view(B, 1, 1, -1), rope[1].view(B, 1, 1, -1))  # broadcast over heads
        # additive mask, built once for all layers: -inf on the positions after each row's own
        after = torch.arange(span, device=tokens.device).unsqueeze(0) > pos.unsqueeze(1)  # (B, S)
        mask = torch.zeros(B, 1, 1, span, device=x.device, dtype=x.dtype)
        mask.masked_fill_(after.view(B, 1, 1, span), float("-inf"))  # (B, 1, 1, S)
        x = x.unsqueeze(1)  # (B, 1, C)
        for block in self.transformer.h:
            x = block.decode_rows(x, cache, pos, mask, rope)
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
        x, rope = self._embed(idx, pos)  # (B, T, C); cos, sin (T, hs/2)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache, start_pos, rope)
        return self.transformer.ln_f(x)
