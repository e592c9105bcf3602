"""Save and load checkpoints: our format, and the Hugging Face GPT-2 layout in both directions.

Our format is a folder with config.json ({"format": "gptbot", "model": GPTConfig, "meta": ...}),
tokenizer.json and model.safetensors (no pickle; the tied LM head is stored once, as wte).
The GPT-2 layout (GPT-2 of every size, DistilGPT2, DialoGPT) stores the same tensors under the
same names, but its Conv1D layers keep their weights transposed relative to nn.Linear.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from model.config import GPTConfig
from model.gpt import GPT
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


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read or written; the message says what is wrong."""


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: ChatTokenizer
    name: str
    config: GPTConfig


def save_checkpoint(
    directory: Path, model: GPT, tokenizer: ChatTokenizer, meta: dict[str, Any] | None = None
) -> None:
    """Write model, tokenizer and meta (JSON-serialisable) to directory in our format."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    del state[TIED_HEAD]  # the same tensor as transformer.wte.weight
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer.save(directory)
    config = {"format": FORMAT, "model": model.config.to_dict(), "meta": meta or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_model(directory: Path, device: str = "cpu") -> LoadedModel:
    """Load our format or a Hugging Face GPT-2 folder (detected from config.json), in eval mode."""
    directory = Path(directory)
    raw = _read_config(directory)
    tokenizer, config = _read_tokenizer_and_config(directory, raw)
    if _is_ours(raw):
        state = _read_safetensors([directory / WEIGHTS_FILE])
        name = str(raw.get("meta", {}).get("name") or directory.resolve().name)
    else:
        state = _read_hf_gpt2_state(directory)
        name = str(raw.get("_name_or_path") or directory.resolve().name)
    model = _build_model(config, state, directory)
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, name=name, config=config)


def load_tokenizer(directory: Path) -> tuple[ChatTokenizer, GPTConfig]:
    """The tokenizer and model config of a folder load_model reads, without reading the weights.

    For a process that only counts tokens, such as the bot whose model runs on another server.
    """
    directory = Path(directory)
    return _read_tokenizer_and_config(directory, _read_config(directory))


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
    """config.json of a folder in our format or the GPT-2 layout; anything else is a CheckpointError."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    raw = _read_json(directory / CONFIG_FILE)
    if not _is_ours(raw) and raw.get("model_type") != "gpt2" and "n_embd" not in raw:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} is neither our format (\"format\": \"{FORMAT}\") "
            "nor a Hugging Face GPT-2 config (\"model_type\": \"gpt2\")"
        )
    return raw


def _is_ours(raw: dict[str, Any]) -> bool:
    return raw.get("format") == FORMAT


def _read_tokenizer_and_config(directory: Path, raw: dict[str, Any]) -> tuple[ChatTokenizer, GPTConfig]:
    if _is_ours(raw):
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
    state = {}
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"missing weights file {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
    return state


def _build_model(config: GPTConfig, state: dict[str, Tensor], directory: Path) -> GPT:
    """A GPT with state (tied head not included) loaded, after checking names and shapes."""
    model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED_HEAD}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [
        f"{k}: expected {list(expected[k])}, got {list(got[k])}"
        for k in sorted(set(expected) & set(got))
        if expected[k] != got[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {directory} does not fit its config: " + " | ".join(problems)
        )
    model.load_state_dict({**state, TIED_HEAD: state["transformer.wte.weight"]})
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
