"""Read GGUF files of Llama-family models (llama, qwen2) into a transformers-style config, a
tokenizer and float32 weights under transformers' names, using gguf-py to parse and dequantize.

llama.cpp's converter permutes the Q/K rows of the llama architecture (not qwen2) so that rotary
pairs are adjacent ("interleaved"); we undo that here, so the weights equal the HF folder's. The
file keeps Llama 3's rope scaling only as a tensor of per-frequency factors (rope_freqs); we
recover the parameters transformers uses and check that they reproduce every factor.
"""

import math
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)
from tqdm import tqdm

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_Q = gguf.GGMLQuantizationType
ROWS_AT_ONCE = 4096  # rows of a tensor decoded together
SUPPORTED_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1,
                   _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)

# llama.cpp's token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_SPECIAL = (_UNKNOWN, _CONTROL)  # matched whole, like tokenizer.json's special added tokens

# Pre-tokenizer regexes by tokenizer.ggml.pre, as in the tokenizer.json of the models they name.
_GPT2_PRES = ("gpt2", "default")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}
_IGNORE_MERGES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")  # as llama.cpp does for Llama 3
PRE_TOKENIZERS = (*_GPT2_PRES, "smollm", *_SPLITS)

# Llama 3 rope scaling: convert_hf_to_gguf stores only the factors; these are the defaults it
# (and every Llama 3.x config.json) uses for the rest.
_LLAMA3_LOW, _LLAMA3_HIGH, _LLAMA3_ORIGINAL = 1.0, 4.0, 8192

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                   "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


class GGUFError(Exception):
    """A GGUF file we cannot load; the message is one line saying what is supported."""


@dataclass(frozen=True)
class GGUFModel:
    """What a GGUF file says about its model, besides the weights."""

    path: Path
    architecture: str
    name: str
    hf_config: dict[str, Any]
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    weight_type: str  # the type most of the blocks' weights are stored in, such as "Q4_1": what precision auto keeps


def read_gguf_metadata(path: Path) -> GGUFModel:
    """The config and tokenizer of a GGUF file, without reading its weights (for token counting)."""
    return _describe(Path(path), _open(Path(path)))


def read_gguf(path: Path, *, progress: bool = True) -> tuple[GGUFModel, "GGUFTensors"]:
    """The model description and its float32 state dict, under transformers' names and shapes: each
    tensor decoded when taken, so that a loader that packs weights as they come never holds the whole
    model in float32."""
    path = Path(path)
    reader = _open(path)
    model = _describe(path, reader)
    config = model.hf_config
    # llama's q and k are stored permuted (see _unpermute), qwen2's as they are
    heads = ({".q_proj.": config["num_attention_heads"], ".k_proj.": config["num_key_value_heads"]}
             if model.architecture == "llama" else {})
    return model, GGUFTensors(path, reader, heads, progress=progress)


class GGUFTensors(MutableMapping[str, torch.Tensor]):
    """A GGUF file's tensors (rope_freqs aside, see _rope_scaling) by transformers' names, decoded to
    float32 at each read; deleting a name forgets it. The progress bar counts the file's bytes as
    tensors are first read, and closes when every tensor has been."""

    def __init__(self, path: Path, reader: gguf.GGUFReader, heads: dict[str, int], *, progress: bool) -> None:
        self._path = path
        self._tensors = {_hf_name(path, t.name): t for t in reader.tensors if t.name != "rope_freqs.weight"}
        self._heads = heads  # name part -> heads: tensors to un-permute
        self._unread = set(self._tensors)
        self._bar = tqdm(total=sum(int(t.n_bytes) for t in self._tensors.values()), unit="B", unit_scale=True,
                         desc=f"loading {path.name}", disable=not progress, file=sys.stderr)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        weights = _dequantize(self._path, tensor)  # (out, in) or (n,)
        for part, n_head in self._heads.items():
            if part in name:
                weights = _unpermute(weights, n_head)
        if name in self._unread:
            self._unread.discard(name)
            self._bar.update(int(tensor.n_bytes))
            if not self._unread:
                self._bar.close()
        return torch.from_numpy(weights)

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        raise TypeError("a GGUF file's tensors are read-only")

    def __delitem__(self, name: str) -> None:
        del self._tensors[name]
        self._unread.discard(name)
        if not self._unread:
            self._bar.close()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tensors))

    def __len__(self) -> int:
        return len(self._tensors)


def _open(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf-py reports bad or cut files with assorted exceptions
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise GGUFError(f"{path.name}: not a readable GGUF file, or a truncated one ({detail}); "
                        "supported: whole GGUF version 2 and 3 files") from error
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise GGUFError(f"{path.name}: tensor {tensor.name} is {tensor.tensor_type.name}; "
                            f"supported types: {', '.join(t.name for t in SUPPORTED_TYPES)}")
    return reader


def _describe(path: Path, reader: gguf.GGUFReader) -> GGUFModel:
    fields = {key: field.contents() for key, field in reader.fields.items()
              if not key.startswith("GGUF.")}
    architecture = fields.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise GGUFError(f"{path.name}: architecture {architecture!r} is not supported; "
                        f"supported: {', '.join(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    tokens = fields.get("tokenizer.ggml.tokens")
    if "token_embd.weight" not in tensors or not tokens:
        raise GGUFError(f"{path.name}: no token_embd.weight or tokenizer.ggml.tokens; supported: "
                        "files from llama.cpp's convert_hf_to_gguf.py")
    hf_config = _hf_config(path, architecture, fields, tensors)
    bos, eos = (fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    return GGUFModel(
        path=path, architecture=architecture, name=fields.get("general.name") or path.stem,
        hf_config=hf_config, tokenizer=_tokenizer(path, fields),
        chat_template=fields.get("tokenizer.chat_template"),
        bos_token=tokens[bos] if bos is not None and bos < len(tokens) else None,
        eos_token=tokens[eos] if eos is not None and eos < len(tokens) else None,
        weight_type=_weight_type(tensors),
    )


def _weight_type(tensors: dict[str, Any]) -> str:
    """The type that holds the most weights of the blocks' matrices (llama.cpp's "Q4_1" files keep
    some tensors in other types)."""
    counts: dict[str, int] = {}
    for name, tensor in tensors.items():
        if name.startswith("blk.") and len(tensor.shape) == 2:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    return max(counts, key=counts.__getitem__) if counts else "F32"


def _hf_config(path: Path, arch: str, fields: dict[str, Any],
               tensors: dict[str, Any]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = fields.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path.name}: metadata {arch}.{key} is missing; supported: files "
                            "from llama.cpp's convert_hf_to_gguf.py")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise GGUFError(f"{path.name}: per-layer head counts are not supported; supported: one "
                        "head count for all layers")
    head_dim = fields.get(f"{arch}.attention.key_length") or hidden // heads
    rope_dim = fields.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path.name}: partial rotary embeddings ({rope_dim} of {head_dim}) are "
                        "not supported; supported: rope over the whole head")
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(path, arch, fields, tensors, rope_theta, head_dim),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),  # ggml order: (hidden, vocab)
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
    }


def _rope_scaling(path: Path, arch: str, fields: dict[str, Any], tensors: dict[str, Any],
                  rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = fields.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(path, fields, arch, _dequantize(path, tensors["rope_freqs.weight"]),
                               rope_theta, head_dim)
    if kind == "linear":
        return {"rope_type": "linear",
                "factor": _f32(fields.get(f"{arch}.rope.scaling.factor", 1.0))}
    if kind != "none":
        raise GGUFError(f"{path.name}: rope scaling {kind!r} is not supported; supported: none, "
                        "linear, llama3")
    return None


def _llama3_scaling(path: Path, fields: dict[str, Any], arch: str, factors: np.ndarray,
                    rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    factor = _f32(factors.max())
    if factor == 1.0:
        return None  # every frequency unscaled
    original = int(fields.get(f"{arch}.rope.scaling.original_context_length", _LLAMA3_ORIGINAL))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": _LLAMA3_LOW,
               "high_freq_factor": _LLAMA3_HIGH, "original_max_position_embeddings": original}
    expected = llama3_rope_factors(rope_theta, head_dim, scaling)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=0, atol=1e-3):
        raise GGUFError(f"{path.name}: rope_freqs does not match Llama 3 scaling (factor {factor:g},"
                        f" low 1, high 4, original {original}); supported: Llama 3 rope scaling")
    return scaling


def llama3_rope_factors(rope_theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, as convert_hf_to_gguf computes rope_freqs."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq  # (head_dim/2,)
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, medium)).astype(np.float32)


def _f32(value: float) -> float:
    """A float32 from the file as config.json spells it: 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _hf_name(path: Path, name: str) -> str:
    stem, _, kind = name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    raise GGUFError(f"{path.name}: tensor {name} is not part of a Llama/Qwen2 model; supported: "
                    "token_embd, blk.N.attn_*/ffn_*, output_norm, output, rope_freqs")


def _dequantize(path: Path, tensor: Any) -> np.ndarray:
    """tensor's values as float32 (out, in) or (n,), decoded a slice of rows at a time: gguf's decoders
    take a few float copies of what they decode, which for a whole embedding is hundreds of MB."""
    data = tensor.data
    try:
        if data.ndim < 2 or len(data) <= ROWS_AT_ONCE:
            weights = gguf.quants.dequantize(data, tensor.tensor_type)
            # F32 comes back as a view of the read-only memory map; copy it out.
            return np.array(weights, dtype=np.float32, copy=not weights.flags.writeable)
        first = gguf.quants.dequantize(data[:ROWS_AT_ONCE], tensor.tensor_type)
        weights = np.empty((len(data), *first.shape[1:]), dtype=np.float32)
        weights[:ROWS_AT_ONCE] = first
        for start in range(ROWS_AT_ONCE, len(data), ROWS_AT_ONCE):
            weights[start : start + ROWS_AT_ONCE] = gguf.quants.dequantize(data[start : start + ROWS_AT_ONCE],
                                                                            tensor.tensor_type)
        return weights
    except (ValueError, NotImplementedError) as error:
        raise GGUFError(f"{path.name}: tensor {tensor.name} cannot be decoded ({error}); "
                        "supported: well-formed files") from error


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's LlamaModel.permute: interleaved rotary pairs back to HF's halves."""
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...)
    return np.ascontiguousarray(
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2).reshape(weights.shape))


def _tokenizer(path: Path, fields: dict[str, Any]) -> Tokenizer:
    kind = fields.get("tokenizer.ggml.model")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{path.name}: tokenizer model {kind!r} is not supported; supported: "
                        "gpt2 (byte-level BPE), llama (SentencePiece BPE)")
    try:
        tokenizer = (_byte_level_tokenizer(path, fields, tokens, types) if kind == "gpt2"
                     else _sentencepiece_tokenizer(fields, tokens, types))
    except GGUFError:
        raise
    except Exception as error:  # the tokenizers library rejects inconsistent vocabularies
        raise GGUFError(f"{path.name}: its {kind} tokenizer cannot be built ({error}); supported: "
                        "vocabularies from llama.cpp's converter") from error
    # llama.cpp matches control and user-defined tokens whole, before any other splitting.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, t_type in zip(tokens, types) if t_type in _SPECIAL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, t_type in zip(tokens, types) if t_type == _USER_DEFINED])
    return tokenizer


def _byte_level_tokenizer(path: Path, fields: dict[str, Any], tokens: list[str],
                          types: list[int]) -> Tokenizer:
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{path.name}: pre-tokenizer {pre!r} is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        # convert_hf_to_gguf stores added tokens as plain text; the BPE needs every other token
        # in the byte alphabet (Ġ for a space).
        if kind not in (*_SPECIAL, _USER_DEFINED) and not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    if pre in _SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":  # SmolLM's tokenizer.json: each digit apart, then GPT-2's regex
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_tokenizer(fields: dict[str, Any], tokens: list[str],
                             types: list[int]) -> Tokenizer:
    """SentencePiece BPE with byte fallback (Llama 2, TinyLlama): the file has scores, no merges."""
    scores: list[float] = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {token: index for index, token in reversed(list(enumerate(tokens)))}
    merges = _merges_from_scores(tokens, types, scores)
    unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk],
                                     fuse_unk=True, byte_fallback=True))
    # llama.cpp puts a space before every piece of text that starts the input or follows a
    # special token, even one that starts with a space, as TinyLlama's tokenizer.json does.
    prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    spaces = normalizers.Replace(" ", "▁")
    tokenizer.normalizer = (normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix
                            else spaces)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _merges_from_scores(tokens: list[str], types: list[int],
                        scores: list[float]) -> list[tuple[str, str]]:
    # SentencePiece BPE joins the adjacent pair whose joined piece scores highest; as BPE merges
    # that is every split of a normal token into two normal tokens, best joined score first
    # (ties: longer left piece, then longer right), as transformers' generate_merges orders them.
    normal = {t for t, kind in zip(tokens, types) if kind == _NORMAL}
    found = [(score, cut, len(token) - cut, token[:cut], token[cut:])
             for token, score in zip(tokens, scores) if token in normal
             for cut in range(1, len(token)) if token[:cut] in normal and token[cut:] in normal]
    found.sort(key=lambda m: m[:3], reverse=True)
    return [(left, right) for *_, left, right in found]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + n) for n, b in enumerate(extra)}}
