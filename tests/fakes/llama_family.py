"""Tiny random Llama-family models for tests: HF folders as transformers saves them, and GGUF files
written the way llama.cpp's convert_hf_to_gguf.py (and llama-quantize, for the k-quants) writes them.

Everything here is deterministic and offline: the tokenizers are trained on a fixed chat corpus and
the weights come from a seeded generator, so two calls with the same arguments give equal files.
"""

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from model.checkpoint import LoadedModel
from model.config import GPTConfig
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# SmolLM2-135M-Instruct's tokenizer_config.json "chat_template", verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

CHAT_SENTENCES = (
    "Hello! How are you doing today?",
    "I'm doing well, thank you. How can I help you?",
    "Can you tell me a joke about computers?",
    "Why did the computer go to the doctor? It had a virus!",
    "What's the weather like in Paris this weekend?",
    "It will be sunny on Saturday and rainy on Sunday.",
    "Please summarise this article in three sentences.",
    "The article describes how small models can run on a laptop.",
    "Write a Python function that adds two numbers.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * 2)",
    "What is the capital of France? The capital of France is Paris.",
    "Translate 'good morning' into German: Guten Morgen.",
    "I don't understand the question, could you rephrase it?",
    "Sure, here is a list: apples, bananas, cherries and dates.",
    "The meeting starts at 10:30 and ends at 12:15.",
    "My phone number is 555-0123, call me after 6 pm.",
    "She said: \"Let's meet at the café near the station.\"",
    "Thanks a lot, that was really helpful!",
    "You're welcome. Is there anything else I can do?",
    "Explain recursion to a five year old.",
    "Recursion is when a function calls itself until it reaches a base case.",
    "How many days are there in a leap year? There are 366 days.",
    "Good night and sweet dreams.",
    "The quick brown fox jumps over the lazy dog.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "Emoji make chats friendlier 😀 👍 🎉",
    "Numbers like 3.14159 and 2.71828 are famous constants.",
    "if (x > 0) { return x; } else { return -x; }",
    "<html><body>Hello, world!</body></html>",
    "What time is it? It's a quarter past nine.",
    "Let me think about that for a moment.",
    "Can you recommend a good book about history?",
    "I would suggest 'Sapiens' by Yuval Noah Harari.",
    "Bonjour, comment ça va ? Très bien, merci.",
    "The assistant answers questions politely and briefly.",
)

# The pre-tokenizer each family's real tokenizer.json uses; the keys are llama.cpp's
# tokenizer.ggml.pre names for them.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt2")
SENTENCEPIECE_SPECIALS = ("<unk>", "<s>", "</s>")

# A Zephyr-style template like TinyLlama-1.1B-Chat's (written here, not copied from its files).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

_FAMILIES = {
    # family: (transformers class name, model_type, rope_theta, rms_norm_eps, pre-tokenizer)
    "llama": ("LlamaForCausalLM", "llama", 10000.0, 1e-5, "smollm"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", 1e6, 1e-6, "qwen2"),
}


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of SmolLM2 ("smollm"), Qwen2 ("qwen2"), Llama 3 ("llama-bpe") or GPT-2."""
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    split = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT}[pre]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def tiny_tokenizer(pre: str = "smollm", vocab_size: int = 500) -> Tokenizer:
    """A byte-level BPE trained on CHAT_SENTENCES, with the ChatML special tokens as ids 0-2.

    `pre` picks the pre-tokenizer (one of PRE_TOKENIZERS); Llama 3's tokenizer also ignores
    merges for words already in the vocabulary, so "llama-bpe" does too.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CHAT_SENTENCES, trainer=trainer)
    if pre == "llama-bpe":
        tokenizer.model.ignore_merges = True
    # Re-add so the specials are normalized=False, as in real tokenizer.json files.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def tiny_sentencepiece_tokenizer(vocab_size: int = 500) -> Tokenizer:
    """A SentencePiece-style BPE with byte fallback, as TinyLlama's tokenizer.json is.

    Ids as in a SentencePiece model: <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then
    the pieces in the order training made them, each scored -rank in the model the ids stand
    for (SentencePiece BPE joins the best-scoring piece first). The merges are derived from those
    scores as transformers' converter derives them from a tokenizer.model.
    """
    from transformers.tokenization_utils_base import generate_merges

    trainer_tokenizer = Tokenizer(models.BPE())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False)
    trainer_tokenizer.train_from_iterator(CHAT_SENTENCES, trainer=trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    joined = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in trained["merges"]]
    chars = sorted(set(trained["vocab"]) - set(joined), key=trained["vocab"].get)
    pieces = list(dict.fromkeys(joined)) + chars
    tokens = [*SENTENCEPIECE_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    merges = generate_merges({p: i for i, p in enumerate(pieces)},
                             {p: -float(rank) for rank, p in enumerate(pieces)})
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # TinyLlama's tokenizer.json: a space before the text and each piece after a special token.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                 normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in SENTENCEPIECE_SPECIALS])
    tokenizer.post_processor = processors.TemplateProcessing(  # Llama's: BOS before each input
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tokenizer


def save_tiny_llama(directory: Path, *, family: str = "llama", seed: int = 0,
                    tied: bool | None = None, rope_scaling: str | None = None,
                    max_shard_size: str | None = None, pre: str | None = None,
                    hidden_size: int = 64, intermediate_size: int = 96) -> Path:
    """Save a tiny random LlamaForCausalLM ("llama") or Qwen2ForCausalLM ("qwen2") as an HF folder.

    Defaults: llama untied with SmolLM2's tokenizer, qwen2 tied (as Qwen2.5-0.5B) with Qwen2's;
    `pre` picks another byte-level tokenizer (PRE_TOKENIZERS), or "sentencepiece" for TinyLlama's
    kind (<s>/</s>, a Zephyr chat template, BOS added). rope_scaling="llama3" gives Llama 3.2's
    rope scaling (with a 32-token original context so it matters within 128 positions);
    max_shard_size (e.g. "40KB") writes a sharded folder with model.safetensors.index.json.
    Weights use std 0.15 instead of 0.02 so greedy decoding does not collapse onto one token.
    Sizes: 2 layers, 4 heads, 2 KV heads, hidden 64, MLP 96, 128 positions.
    """
    import transformers  # a test-only dependency; imported here so the module imports without it

    class_name, model_type, rope_theta, eps, default_pre = _FAMILIES[family]
    tied = family == "qwen2" if tied is None else tied
    tokenizer, tokenizer_config = _tokenizer_files(pre or default_pre)
    ids = {role: tokenizer.token_to_id(tokenizer_config[f"{role}_token"])
           for role in ("bos", "eos", "pad")}
    rope = dict(_LLAMA3_ROPE) if rope_scaling == "llama3" else {"rope_type": "default"}
    if rope_scaling not in (None, "llama3"):
        raise ValueError(f"rope_scaling {rope_scaling!r}: only None or 'llama3'")
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=eps,
        rope_parameters={**rope, "rope_theta": rope_theta}, tie_word_embeddings=tied,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        architectures=[class_name],
    )
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains near 1, but not all equal
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    directory = Path(directory)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    transformers.GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                  pad_token_id=ids["pad"]).save_pretrained(directory)
    _write_hub_style_rope(directory / "config.json", rope_theta, rope if rope_scaling else None)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return directory


def _tokenizer_files(pre: str) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer and a tokenizer_config.json like SmolLM2's, or TinyLlama-Chat's."""
    if pre == "sentencepiece":
        tokenizer = tiny_sentencepiece_tokenizer()
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                  "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
                  "chat_template": ZEPHYR_TEMPLATE, "legacy": False,
                  "tokenizer_class": "LlamaTokenizer"}
    else:
        tokenizer = tiny_tokenizer(pre)
        config = {"add_prefix_space": False, "add_bos_token": False, "bos_token": "<|im_start|>",
                  "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>",
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                  "chat_template": CHATML_TEMPLATE, "tokenizer_class": "GPT2Tokenizer"}
    config |= {"clean_up_tokenization_spaces": False, "model_max_length": 128,
               "added_tokens_decoder": {
                   str(i): {"content": t.content, "special": True, "normalized": False,
                            "lstrip": False, "rstrip": False, "single_word": False}
                   for i, t in tokenizer.get_added_tokens_decoder().items()}}
    return tokenizer, config


def _write_hub_style_rope(config_path: Path, rope_theta: float, scaling: dict | None) -> None:
    # transformers 5 saves "rope_parameters"; the config.json files on the Hub (SmolLM2, Qwen2.5,
    # Llama 3.2) hold "rope_theta" and "rope_scaling", which transformers 5 still reads.
    config = json.loads(config_path.read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = rope_theta
    config["rope_scaling"] = scaling
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def load_hf_state(hf_folder: Path) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights, single-file or sharded, as float32."""
    folder = Path(hf_folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(folder / file))
    return {k: v.float() for k, v in state.items()}


QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M, "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}

# llama-quantize's fallback when a row is not a whole number of 256-value k-quant blocks;
# convert_hf_to_gguf falls back to F16 when a row does not fit the 32-value blocks.
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0", "Q8_0": "F16", "Q5_0": "F16", "Q4_0": "F16",
             "Q4_1": "F16"}

_TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama/Qwen2 tensor name."""
    if hf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_NAMES[module]}.{kind}"


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half rows to llama.cpp's interleaved."""
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...)
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(hf_folder: Path, path: Path, *, qtype: str = "F32",
               architecture: str | None = None) -> Path:
    """Write the HF folder's model as a GGUF file, as `convert_hf_to_gguf.py --outtype` (F32, F16,
    BF16, Q8_0) or that followed by `llama-quantize` (Q4_0, Q4_1, Q4_K, Q6_K) would.

    1-D tensors stay F32; 2-D tensors whose rows do not fit the type's blocks fall back as
    llama.cpp's do (_FALLBACK). `architecture` overrides the one config.json implies.
    """
    folder, path = Path(hf_folder), Path(path)
    config = json.loads((folder / "config.json").read_text())
    arch = architecture or {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[
        config["architectures"][0]]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    writer = gguf.GGUFWriter(path, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(_FILE_TYPES[qtype])
    if "head_dim" in config:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":  # LlamaModel.set_gguf_parameters; Qwen2 keeps TextModel's
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    _add_tokenizer(writer, folder, config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        original = scaling["original_max_position_embeddings"]
        if original != 8192:
            # convert_hf_to_gguf looks for this key at the top level of config.json only and so
            # always uses 8192; we keep the true value, and say so, so the file holds the same model.
            writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_tensor("rope_freqs.weight",
                          llama3_rope_factors(config["rope_theta"], head_dim, scaling, original))
    for hf_name, tensor in load_hf_state(folder).items():
        data = tensor.numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = permute_qk(data, n_head)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = permute_qk(data, n_kv)
        _add_weight(writer, gguf_tensor_name(hf_name), data, qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama3_rope_factors(rope_theta: float, head_dim: int, scaling: dict[str, Any],
                        original: int) -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf writes for Llama 3 scaling: (head_dim/2,) factors."""
    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_wavelen, high_wavelen = original / low, original / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_weight(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: str) -> None:
    data = data.astype(np.float32)
    if data.ndim == 1 or qtype == "F32":
        writer.add_tensor(name, data)
        return
    while qtype in _FALLBACK and data.shape[-1] % gguf.GGML_QUANT_SIZES[_ggml_type(qtype)][0]:
        qtype = _FALLBACK[qtype]
    ggml_type = _ggml_type(qtype)
    writer.add_tensor(name, quantize(data, qtype), raw_dtype=ggml_type)


def _ggml_type(qtype: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[qtype]


def quantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize (rows, cols) float32 to GGUF bytes; gguf-py lacks Q4_K/Q6_K quantizers."""
    if qtype == "Q4_K":
        return _blocks(data, _quantize_q4_k_blocks)
    if qtype == "Q6_K":
        return _blocks(data, _quantize_q6_k_blocks)
    return gguf.quants.quantize(data, _ggml_type(qtype))


def _blocks(data: np.ndarray, quantize_blocks: Any) -> np.ndarray:
    blocks = quantize_blocks(data.reshape(-1, gguf.QK_K))  # (rows * cols/256, bytes per block)
    return blocks.reshape(data.shape[0], -1)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _quantize_q4_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """Q4_K, after ggml-quants.c quantize_row_q4_K_ref without its iterative scale search.

    Block of 256 = 8 sub-blocks of 32; x ~= d * sc[j] * q - dmin * m[j] with q in 0..15 and
    6-bit sc, m. Layout: d (f16), dmin (f16), scales[12], qs[128].
    """
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # (n, 8), mins are stored negated and must be >= 0
    scale = (sub.max(axis=-1) - lo) / 15.0  # (n, 8)
    d = _f16(scale.max(axis=-1) / 63.0)  # (n,)
    dmin = _f16(-lo.min(axis=-1) / 63.0)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / df)), 0, 63).astype(np.uint8)  # (n, 8)
        m = np.clip(np.nan_to_num(np.rint(-lo / dminf)), 0, 63).astype(np.uint8)
        step = (df * sc)[..., None]  # (n, 8, 1)
        offset = (dminf * m)[..., None]
        q = np.clip(np.nan_to_num(np.rint((sub + offset) / step)), 0, 15).astype(np.uint8)
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    q = q.reshape(n, 4, 2, 32)  # sub-blocks 2c and 2c+1 share 32 bytes: low and high nibbles
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8),
                           scales, qs], axis=-1)


def _quantize_q6_k_blocks(blocks: np.ndarray) -> np.ndarray:
    """Q6_K, after quantize_row_q6_K_ref without its scale search.

    Block of 256 = 16 sub-blocks of 16; x ~= d * scales[j] * (q - 32) with q in 0..63 and int8
    scales. Layout: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16], d (f16).
    """
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31.0  # (n, 16)
    d = _f16(scale.max(axis=-1) / 127.0)  # (n,)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.clip(np.nan_to_num(np.rint(scale / df)), 0, 127).astype(np.int8)  # (n, 16)
        step = (df * sc)[..., None]
        q = np.clip(np.nan_to_num(np.rint(sub / step)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 256)
    low = (q & 0x0F).reshape(n, 2, 2, 64)  # value h*128 + s*64 + i -> nibble s of ql[h*64 + i]
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = (q >> 4).reshape(n, 2, 4, 32)  # value h*128 + t*32 + j -> bits 2t of qh[h*32 + j]
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)],
                          axis=-1)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    reverse = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    sentencepiece = json.loads(tokenizer.to_str())["model"].get("byte_fallback", False)
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in reverse:
            types.append(gguf.TokenType.UNUSED)
        elif sentencepiece and token == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special
                         else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    if sentencepiece:
        # convert_hf_to_gguf's _set_vocab_sentencepiece reads tokenizer.model, which we do not
        # write; its BPE scores are -rank in id order, so we recover them from the ids.
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        normal = [i for i, t in enumerate(types) if t == gguf.TokenType.NORMAL]
        scores = dict(zip(normal, (-float(rank) for rank in range(len(normal))), strict=True))
        writer.add_token_scores([scores.get(i, 0.0) for i in range(len(tokens))])
    else:
        # convert_hf_to_gguf's _set_vocab_gpt2: added special tokens CONTROL, other added ones
        # USER_DEFINED, [PADn] for ids the tokenizer lacks, and the pre-tokenizer by name.
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not sentencepiece, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _pre_name(tokenizer: Tokenizer) -> str:
    # convert_hf_to_gguf recognises a pre-tokenizer by hashing a test text's tokens; we compare
    # the pre-tokenizer's own definition with the ones we know.
    actual = json.loads(tokenizer.to_str())["pre_tokenizer"]
    for pre in PRE_TOKENIZERS:
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = byte_level_pre_tokenizer(pre)
        if json.loads(probe.to_str())["pre_tokenizer"] == actual:
            return pre
    raise ValueError(f"unknown pre-tokenizer {actual}")


def write_unsupported_gguf(path: Path, what: str = "architecture") -> Path:
    """A tiny GGUF our reader must refuse: an architecture it does not know ("mamba"), or a llama
    whose attention weight is IQ2_XXS ("qtype")."""
    path = Path(path)
    arch = "mamba" if what == "architecture" else "llama"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(pre_tokenizers.ByteLevel.alphabet())
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", np.zeros((256, 256), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(256, dtype=np.float32))
    if what == "qtype":
        # IQ2_XXS: 66 bytes per 256 values; zero bytes are a valid (all-zero-scale) block.
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XXS][1]
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, block_bytes), dtype=np.uint8),
                          raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    elif what != "architecture":
        raise ValueError(f"what={what!r}: 'architecture' or 'qtype'")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chatml_tokenizer() -> ChatTokenizer:
    """Our ChatTokenizer over tiny_tokenizer() with SmolLM2's chat template: an instruct model's, small."""
    return ChatTokenizer(tiny_tokenizer(), chat_template=CHATML_TEMPLATE, bos_token="<|im_start|>",
                         eos_token="<|im_end|>")


def tiny_chat_model(block_size: int = 128, n_layer: int = 2) -> LoadedModel:
    """A tiny random GPT of ours (seeded) over chatml_tokenizer()."""
    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32)
    return LoadedModel(model=GPT(config).eval(), tokenizer=tokenizer, name="smol", config=config)
