"""The Llama family (LlamaForCausalLM, Qwen2ForCausalLM: SmolLM2, TinyLlama, Qwen2.5, Llama 3.2) in our GPT:
its config.json as a GPTConfig, and its tensors under our names.

transformers' layout keeps q, k and v (and the SwiGLU's gate and up) as separate Linears; ours
stores each group as one (c_attn, c_fc), so that a block runs four products, as GPT-2's does.
A GGUF file gives the same config and tensors (model.gguf_file), so both roads end here.
"""

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor

from model.config import GPTConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = tuple(ARCHITECTURES.values())
# tensors older checkpoints carry that the network computes itself
_COMPUTED = (".rotary_emb.inv_freq",)


class UnsupportedModel(ValueError):
    """A Llama-family config with settings our network does not reproduce; one line says which."""


def is_llama_family(raw: dict[str, Any]) -> bool:
    architectures = raw.get("architectures") or []
    return raw.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in architectures)


def llama_config(raw: dict[str, Any], max_context: int | None = None) -> GPTConfig:
    """Our GPTConfig of a transformers LlamaConfig / Qwen2Config dict; max_context caps the window
    (these models allow 8k to 128k positions, more than a CPU answers in time and the key/value pool holds)."""
    model_type = raw.get("model_type") or ARCHITECTURES.get((raw.get("architectures") or [""])[0], "")
    qwen2 = model_type == "qwen2"
    hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}  # transformers 5 / 4
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    checks = [
        ("hidden_act", raw.get("hidden_act", "silu") == "silu"),
        ("head_dim", raw.get("head_dim") in (None, hidden // heads)),
        ("mlp_bias", not raw.get("mlp_bias", False)),
        ("attention_bias", qwen2 or not raw.get("attention_bias", False)),
        ("use_sliding_window", not raw.get("use_sliding_window", False)),
        ("rope_type", rope_type in ("default", "llama3")),
    ]
    unsupported = [f"{key}={raw.get(key, rope_type if key == 'rope_type' else None)!r}" for key, ok in checks if not ok]
    if unsupported:
        raise UnsupportedModel(f"unsupported {model_type} settings: {', '.join(unsupported)}")
    context = _int(raw, "max_position_embeddings")
    llama3 = rope_type == "llama3"
    try:
        return GPTConfig(
            vocab_size=_int(raw, "vocab_size"),
            block_size=min(context, max_context) if max_context else context,
            n_layer=_int(raw, "num_hidden_layers"),
            n_head=heads,
            n_embd=hidden,
            n_kv_head=int(raw.get("num_key_value_heads") or heads),
            n_inner=_int(raw, "intermediate_size"),
            bias=False,
            qkv_bias=qwen2,
            pos_encoding="rope",
            norm="rmsnorm",
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            mlp="swiglu",
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta") or raw.get("rope_theta") or 10000.0),
            rope_scaling="llama3" if llama3 else "none",
            rope_factor=float(rope.get("factor", 1.0)) if llama3 else 1.0,
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)) if llama3 else 1.0,
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)) if llama3 else 4.0,
            rope_original_context=int(rope.get("original_max_position_embeddings", 8192)) if llama3 else 8192,
        )
    except ValueError as e:
        raise UnsupportedModel(str(e)) from e


def llama_parts(hf: MutableMapping[str, Tensor], config: GPTConfig) -> Iterator[dict[str, Tensor]]:
    """Our state dict (float32; the tied LM head left out) from transformers' tensor names, a block's
    tensors at a time, then the rest.

    hf is emptied as its tensors move over, so that each separate q, k, v (and gate, up) is freed
    once joined, and a loader that takes each part as it comes holds one block in float32 at a time
    (hf may decode each tensor as it is taken: model.gguf_file.GGUFTensors).
    Missing or unexpected names are left for the caller's check against the network.
    """
    for name in [k for k in hf if k.endswith(_COMPUTED)]:
        del hf[name]

    def take(name: str) -> Tensor:
        return hf.pop(name).float()

    def take_all(names: list[str]) -> Tensor:
        return torch.cat([take(n) for n in names]) if all(n in hf for n in names) else torch.empty(0)

    for i in range(config.n_layer):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = [f"{src}self_attn.{p}_proj" for p in "qkv"]
        moves = {
            "ln_1.weight": take_all([src + "input_layernorm.weight"]),
            "attn.c_attn.weight": take_all([a + ".weight" for a in attn]),
            "attn.c_proj.weight": take_all([src + "self_attn.o_proj.weight"]),
            "ln_2.weight": take_all([src + "post_attention_layernorm.weight"]),
            "mlp.c_fc.weight": take_all([src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]),
            "mlp.c_proj.weight": take_all([src + "mlp.down_proj.weight"]),
        }
        if config.qkv_bias:
            moves["attn.c_attn.bias"] = take_all([a + ".bias" for a in attn])
        yield {dst + k: v for k, v in moves.items() if v.numel()}
    rest: dict[str, Tensor] = {}
    for ours, theirs in (("transformer.wte.weight", "model.embed_tokens.weight"),
                         ("transformer.ln_f.weight", "model.norm.weight")):
        if theirs in hf:
            rest[ours] = take(theirs)
    if "lm_head.weight" in hf:
        head = take("lm_head.weight")
        if not config.tie_embeddings:
            rest["lm_head.weight"] = head
    rest.update((name, hf[name]) for name in hf)  # whatever is left is unexpected: the caller names it
    hf.clear()
    yield rest


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnsupportedModel(f"config.json needs an integer {key}, got {value!r}")
    return value
