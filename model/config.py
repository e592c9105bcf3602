"""GPTConfig: the shape of the network, saved with every checkpoint and used to rebuild it."""

from dataclasses import asdict, dataclass, fields
from typing import Any

POS_ENCODINGS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("none", "llama3")


@dataclass
class GPTConfig:
    """The GPT-2 family's options (learned or sinusoidal positions, LayerNorm, GELU, tied head) and the
    Llama family's (rotary positions, RMSNorm, SwiGLU, grouped-query attention, q/k/v biases as
    Qwen2, a separate output layer). Options left unset take their derived value in __post_init__."""

    vocab_size: int
    block_size: int = 256  # longest context the model sees (positions 0 .. block_size-1)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    pos_encoding: str = "learned"  # "learned" (GPT-2), "sinusoidal" (fixed sin/cos) or "rope" (rotary, Llama)
    norm: str = "layernorm"  # or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # GELU(x W1) W2, or "swiglu": (silu(x Wg) * x Wu) W2 (Llama)
    n_inner: int | None = None  # the feed-forward width; None: 4 * n_embd
    n_kv_head: int | None = None  # key/value heads, fewer than n_head for grouped-query attention; None: n_head
    qkv_bias: bool | None = None  # biases on q, k, v alone (Qwen2: True, with bias False); None: bias
    tie_embeddings: bool = True  # the output layer is the token embedding (GPT-2, SmolLM2) or its own (Llama)
    rope_theta: float = 10000.0  # the rotary frequencies' base
    rope_scaling: str = "none"  # "llama3": Llama 3.1+'s long-context frequency scaling, with the three below
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        for name, allowed in (("pos_encoding", POS_ENCODINGS), ("norm", NORMS), ("mlp", MLPS),
                              ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2 != 0:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.pos_encoding == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("GPTConfig.norm_eps and rope_theta must be > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Rebuild from to_dict(); unknown or missing keys are reported by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys: {unknown} (known: {sorted(known)})")
        if "vocab_size" not in d:
            raise ValueError("GPTConfig needs 'vocab_size'")
        return cls(**d)
