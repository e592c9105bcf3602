"""Save and load checkpoints: our format, the Hugging Face GPT-2 layout in both directions, and
Llama-family models (HF folders and GGUF files) for reading.

Our format is a folder with config.json ({"format": "gptbot", "model": GPTConfig, "meta": ...}),
tokenizer.json and model.safetensors (no pickle; a tied LM head is stored once, as wte).
The GPT-2 layout (GPT-2 of every size, DistilGPT2, DialoGPT) stores the same tensors under the
same names, but its Conv1D layers keep their weights transposed relative to nn.Linear.
LlamaForCausalLM and Qwen2ForCausalLM folders (SmolLM2, TinyLlama, Qwen2.5, Llama 3.2) and
.gguf files of the llama and qwen2 architectures go through model.llama_weights.
"""

import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from model.config import GPTConfig
from model.gpt import GPT, Block
from model.llama_weights import UnsupportedModel, is_llama_family, llama_config, llama_parts
from model.tokenizer import GPT2_EOS, SPECIAL_TOKENS, ChatTokenizer

FORMAT = "gptbot"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HF_SHARD_INDEX = "model.safetensors.index.json"
HF_PICKLE_FILE = "pytorch_model.bin"
TIED_HEAD = "lm_head.weight"
# GPT-2's Conv1D stores weight as (in, out); nn.Linear as (out, in)
CONV1D_WEIGHTS = (
    ".attn.c_attn.weight",
    ".attn.c_proj.weight",
    ".mlp.c_fc.weight",
    ".mlp.c_proj.weight",
)
# causal-mask buffers that older GPT-2 files carry (not ".c_attn.bias"); we build the mask
HF_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU with the tanh approximation
GGUF_SUFFIX = ".gguf"
SUPPORTED = (
    "our checkpoint folders, GPT-2-family folders (GPT2LMHeadModel), LlamaForCausalLM and "
    "Qwen2ForCausalLM folders (safetensors), and .gguf files of the llama and qwen2 architectures"
)
OnBlock = Callable[[Block, str], None]  # (a block whose weights are in, what the file stores them as)
PROGRESS_BYTES = 50 * 2**20  # loading more weights than this shows a progress bar


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read or written; the message says what is wrong."""


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: ChatTokenizer
    name: str
    config: GPTConfig
    stored_as: str = "float32"  # how the file held the weights: a GGUF's type, such as "Q4_1"


def save_checkpoint(
    directory: Path, model: GPT, tokenizer: ChatTokenizer, meta: dict[str, Any] | None = None
) -> None:
    """Write model, tokenizer and meta (JSON-serialisable) to directory in our format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state[TIED_HEAD]  # the same tensor as transformer.wte.weight
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory)
    config = {"format": FORMAT, "model": model.config.to_dict(), "meta": meta or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_model(path: Path, device: str = "cpu", max_context: int | None = None,
               on_block: OnBlock | None = None) -> LoadedModel:
    """Load a model in eval mode: our format, a GPT-2 or Llama-family HF folder, or a .gguf file.

    max_context caps the window of models that allow more positions (rotary models only:
    learned positions are part of the weights). on_block is called with each Block as soon as its
    weights are in, and what the file stores them as (LoadedModel.stored_as): the inference engine
    packs them there (model.inference_weights.packing), so that a GGUF file's blocks are never all
    in float32 at once.
    """
    path = Path(path)
    if path.suffix == GGUF_SUFFIX or path.is_file():
        return _load_gguf(path, device, max_context, on_block)
    raw = _read_config(path)
    tokenizer, config = _read_tokenizer_and_config(path, raw, max_context)
    parts: Iterable[dict[str, Tensor]]
    if _is_ours(raw):
        parts = [_read_safetensors([path / WEIGHTS_FILE])]
        name = str(raw.get("meta", {}).get("name") or path.resolve().name)
    elif is_llama_family(raw):
        parts = llama_parts(_read_hf_weights(path), config)
        name = str(raw.get("_name_or_path") or path.resolve().name)
    else:
        parts = [_read_hf_gpt2_state(path)]
        name = str(raw.get("_name_or_path") or path.resolve().name)
    model = _build_model(config, parts, path, on_block if device == "cpu" else None)
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, name=name, config=config)


def load_tokenizer(path: Path, max_context: int | None = None) -> tuple[ChatTokenizer, GPTConfig]:
    """The tokenizer and model config of what load_model reads, without reading the weights.

    For a process that only counts tokens, such as the bot whose model runs on another server.
    """
    path = Path(path)
    if path.suffix == GGUF_SUFFIX or path.is_file():
        from model.gguf_file import GGUFError, read_gguf_metadata

        try:
            gguf = read_gguf_metadata(path)
        except GGUFError as e:
            raise CheckpointError(str(e)) from e
        return _gguf_tokenizer(gguf), _gguf_config(gguf, max_context)
    return _read_tokenizer_and_config(path, _read_config(path), max_context)


def _load_gguf(path: Path, device: str, max_context: int | None, on_block: OnBlock | None) -> LoadedModel:
    from model.gguf_file import GGUFError, read_gguf

    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        gguf, hf_state = read_gguf(path, progress=True)
        config = _gguf_config(gguf, max_context)
        model = _build_model(config, llama_parts(hf_state, config), path, on_block if device == "cpu" else None,
                             gguf.weight_type)
    except GGUFError as e:
        raise CheckpointError(str(e)) from e
    return LoadedModel(model=model.to(device).eval(), tokenizer=_gguf_tokenizer(gguf), name=gguf.name, config=config,
                       stored_as=gguf.weight_type)


def _gguf_config(gguf: Any, max_context: int | None) -> GPTConfig:
    try:
        return llama_config(gguf.hf_config, max_context)
    except UnsupportedModel as e:
        raise CheckpointError(f"{gguf.path}: {e}") from e


def _gguf_tokenizer(gguf: Any) -> ChatTokenizer:
    try:
        return ChatTokenizer(
            gguf.tokenizer, chat_template=gguf.chat_template, bos_token=gguf.bos_token, eos_token=gguf.eos_token
        )
    except ValueError as e:
        raise CheckpointError(f"cannot use the tokenizer in {gguf.path}: {e}") from e


def export_gpt2(model: GPT, tokenizer: ChatTokenizer, directory: Path) -> None:
    """Write the HF GPT-2 layout, loadable by transformers' GPT2LMHeadModel.from_pretrained."""
    config = model.config
    if config.pos_encoding != "learned":
        raise CheckpointError(
            f"cannot export to GPT-2: GPT-2 has learned positions, this model {config.pos_encoding}"
        )
    if not config.bias:
        raise CheckpointError("cannot export to GPT-2: GPT-2 has biases, this model bias=False")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == TIED_HEAD:
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name] = tensor.detach().contiguous().cpu()
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    eos = GPT2_EOS if not tokenizer.is_chat_format else SPECIAL_TOKENS[-1]
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "tie_word_embeddings": True,
    }
    _write_json(directory / CONFIG_FILE, hf_config)
    tokenizer.save_gpt2_files(directory)
    tokenizer.save(directory)
    specials = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
    if tokenizer.is_chat_format:
        specials["additional_special_tokens"] = SPECIAL_TOKENS[:-1]
    _write_json(directory / "special_tokens_map.json", specials)
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": config.block_size,
            "add_prefix_space": False,
            **specials,
        },
    )


def _read_config(directory: Path) -> dict[str, Any]:
    """config.json of a folder load_model reads; anything else is a CheckpointError saying what is supported."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    raw = _read_json(directory / CONFIG_FILE)
    if not _is_ours(raw) and raw.get("model_type") != "gpt2" and "n_embd" not in raw and not is_llama_family(raw):
        kind = raw.get("architectures") or raw.get("model_type") or "unknown"
        raise CheckpointError(f"{directory / CONFIG_FILE}: model {kind} is not supported; supported: {SUPPORTED}")
    return raw


def _is_ours(raw: dict[str, Any]) -> bool:
    return raw.get("format") == FORMAT


def _read_tokenizer_and_config(
    directory: Path, raw: dict[str, Any], max_context: int | None = None
) -> tuple[ChatTokenizer, GPTConfig]:
    if is_llama_family(raw):
        try:
            config = llama_config(raw, max_context)
        except UnsupportedModel as e:
            raise CheckpointError(f"{directory / CONFIG_FILE}: {e}") from e
        try:
            tokenizer = ChatTokenizer.load(directory)
        except Exception as e:  # tokenizers raises plain Exception
            raise CheckpointError(f"cannot read the tokenizer in {directory}: {e}") from e
    elif _is_ours(raw):
        try:
            config = GPTConfig.from_dict(raw["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"bad model config in {directory / CONFIG_FILE}: {e}") from e
        try:
            tokenizer = ChatTokenizer.load(directory)
        except Exception as e:  # tokenizers raises plain Exception
            raise CheckpointError(f"cannot read the tokenizer in {directory}: {e}") from e
    else:
        config, tokenizer = _config_from_hf(raw, directory), _read_hf_tokenizer(directory)
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
            f"{config.vocab_size} embeddings"
        )
    return tokenizer, config


def _read_hf_gpt2_state(directory: Path) -> dict[str, Tensor]:
    """The GPT-2 layout's tensors under our names, Conv1D weights transposed, the tied head left out."""
    state = {}
    for name, tensor in _read_hf_weights(directory).items():
        name = name.removeprefix("transformer.")
        if name.endswith(HF_MASK_BUFFERS):
            continue
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name if name == TIED_HEAD else "transformer." + name] = tensor
    head = state.pop(TIED_HEAD, None)
    wte = state.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise CheckpointError(
            f"{directory}: lm_head.weight differs from transformer.wte.weight; "
            "only GPT-2 models with tied embeddings are supported"
        )
    return state


def _config_from_hf(raw: dict[str, Any], directory: Path) -> GPTConfig:
    """Our GPTConfig from a GPT2Config dict; settings our network cannot reproduce are errors."""
    where = directory / CONFIG_FILE
    n_embd = raw.get("n_embd", 768)
    checks = [
        ("activation_function", raw.get("activation_function", "gelu_new") in GPT2_ACTIVATIONS),
        ("n_inner", raw.get("n_inner") in (None, 4 * n_embd)),
        ("layer_norm_epsilon", abs(raw.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12),
        ("scale_attn_weights", raw.get("scale_attn_weights", True) is True),
        ("scale_attn_by_inverse_layer_idx", not raw.get("scale_attn_by_inverse_layer_idx", False)),
        ("tie_word_embeddings", raw.get("tie_word_embeddings", True) is True),
    ]
    unsupported = [f"{key}={raw.get(key)!r}" for key, ok in checks if not ok]
    if unsupported:
        raise CheckpointError(f"{where}: unsupported GPT-2 settings: {', '.join(unsupported)}")
    try:
        return GPTConfig(
            vocab_size=raw.get("vocab_size", 50257),
            block_size=raw.get("n_positions", 1024),
            n_layer=raw.get("n_layer", 12),
            n_head=raw.get("n_head", 12),
            n_embd=n_embd,
            dropout=0.0,  # inference only; GPT-2's pdrop settings are for training
            bias=True,
            pos_encoding="learned",
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _read_hf_tokenizer(directory: Path) -> ChatTokenizer:
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    try:
        if vocab.is_file() and merges.is_file():
            return ChatTokenizer.from_gpt2_files(vocab, merges)
        if (directory / "tokenizer.json").is_file():
            return ChatTokenizer.load(directory)
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer in {directory}: {e}") from e
    raise CheckpointError(f"{directory} has no tokenizer: expected vocab.json + merges.txt")


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    if (directory / WEIGHTS_FILE).is_file():
        return _read_safetensors([directory / WEIGHTS_FILE])
    if (directory / HF_SHARD_INDEX).is_file():
        shards = sorted(set(_read_json(directory / HF_SHARD_INDEX)["weight_map"].values()))
        return _read_safetensors([directory / s for s in shards])
    if (directory / HF_PICKLE_FILE).is_file():
        try:
            # weights_only: a .bin is a pickle, so refuse anything but tensors
            return torch.load(directory / HF_PICKLE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {directory / HF_PICKLE_FILE}: {e}") from e
    raise CheckpointError(
        f"{directory} has no weights: expected {WEIGHTS_FILE}, {HF_SHARD_INDEX} or {HF_PICKLE_FILE}"
    )


def _read_safetensors(paths: list[Path]) -> dict[str, Tensor]:
    """Every tensor of the files; a progress bar (stderr) where they are large."""
    state = {}
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"missing weights file {path}")
    total = sum(path.stat().st_size for path in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {paths[0].parent.name}", file=sys.stderr,
              disable=total < PROGRESS_BYTES, leave=False) as bar:
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        state[key] = f.get_tensor(key)
                        bar.update(state[key].nbytes)
            except Exception as e:
                raise CheckpointError(f"cannot read {path}: {e}") from e
    return state


def _build_model(config: GPTConfig, parts: Iterable[dict[str, Tensor]], directory: Path,
                 on_block: OnBlock | None = None, stored_as: str = "float32") -> GPT:
    """A GPT with the tensors of parts (a whole state dict, or a block's at a time; tied head not included)
    loaded, after checking names and shapes. on_block gets each block once its weights are in."""
    with torch.device("meta"):  # shapes only, until each tensor is assigned
        model = GPT(config)
    tied = config.tie_embeddings
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_HEAD or not tied}
    waiting = {i: {k for k in expected if k.startswith(f"transformer.h.{i}.")} for i in range(config.n_layer)}
    got: set[str] = set()
    unexpected: list[str] = []
    wrong: dict[str, str] = {}
    for part in parts:
        fits = {}
        for name, tensor in part.items():
            if name not in expected:
                unexpected.append(name)
            elif tuple(tensor.shape) != expected[name]:
                wrong[name] = f"{name}: expected {list(expected[name])}, got {list(tensor.shape)}"
            else:
                fits[name] = tensor.float()  # float32, as trained and as the engine runs on CPU
        model.load_state_dict(fits, strict=False, assign=True)
        got.update(fits)
        del fits, part
        for i in [i for i, names in waiting.items() if names <= got]:
            del waiting[i]
            if on_block is not None:
                on_block(model.transformer.h[i], stored_as)
    problems = []
    missing = sorted(set(expected) - got - set(wrong))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(sorted(unexpected))}")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong[k] for k in sorted(wrong))}")
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its config: " + " | ".join(problems)
        )
    model.loaded()
    return model


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
