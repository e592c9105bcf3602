"""Checkpoints: our format round trip, Hugging Face GPT-2 import/export parity, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError, export_gpt2, load_model, load_tokenizer, save_checkpoint
from model.generate import SamplingParams, generate_tokens

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def hf_model():
    """A tiny random GPT-2 as transformers builds it, over the real GPT-2 vocabulary."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                                     vocab_size=50257)
    return transformers.GPT2LMHeadModel(config).eval()


def _with_gpt2_tokenizer(folder: Path, gpt2_files: Path) -> Path:
    shutil.copy(gpt2_files / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_files / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def hf_dir(hf_model, gpt2_files: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_safetensors")
    hf_model.save_pretrained(folder)
    return _with_gpt2_tokenizer(folder, gpt2_files)


@pytest.fixture(scope="module")
def hf_bin_dir(hf_model, gpt2_files: Path, tmp_path_factory) -> Path:
    """The layout of the original GPT-2 pytorch_model.bin on the Hub: a pickled state dict
    without the "transformer." prefix, with lm_head.weight and the causal-mask buffers."""
    folder = tmp_path_factory.mktemp("hf_bin")
    hf_model.config.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    return _with_gpt2_tokenizer(folder, gpt2_files)


@pytest.fixture
def ours_dir(make_model, chat_tokenizer, tmp_path: Path) -> Path:
    save_checkpoint(tmp_path / "ours", make_model(), chat_tokenizer, meta={"name": "tiny", "step": 3})
    return tmp_path / "ours"


def test_our_format_round_trips(make_model, chat_tokenizer, ours_dir: Path) -> None:
    original = make_model()
    loaded = load_model(ours_dir)
    assert loaded.name == "tiny"
    assert loaded.config == original.config
    assert not loaded.model.training
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    idx = torch.randint(0, 400, (1, 16))
    torch.testing.assert_close(loaded.model(idx)[0], original(idx)[0], atol=0, rtol=0)
    assert loaded.tokenizer.encode("Hello there") == chat_tokenizer.encode("Hello there")
    assert loaded.tokenizer.eos_id == chat_tokenizer.eos_id

    assert sorted(p.name for p in ours_dir.iterdir()) == ["config.json", "model.safetensors",
                                                         "tokenizer.json"]
    config = json.loads((ours_dir / "config.json").read_text())
    assert config["format"] == "gptbot"
    assert config["meta"] == {"name": "tiny", "step": 3}
    assert config["model"] == original.config.to_dict()
    with safe_open(str(ours_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once


def test_sinusoidal_model_round_trips(make_model, chat_tokenizer, tmp_path: Path) -> None:
    original = make_model(pos_encoding="sinusoidal", bias=False)
    save_checkpoint(tmp_path, original, chat_tokenizer)
    loaded = load_model(tmp_path)
    assert loaded.name == tmp_path.name
    idx = torch.randint(0, 400, (2, 10))
    torch.testing.assert_close(loaded.model(idx)[0], original(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("folder", ["ours_dir", "hf_dir", "hf_bin_dir"])
def test_load_tokenizer_reads_what_load_model_does_without_the_weights(folder: str, request, tmp_path: Path) -> None:
    source = request.getfixturevalue(folder)
    loaded = load_model(source)
    copy = tmp_path / "without_weights"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    tokenizer, config = load_tokenizer(copy)
    assert config == loaded.config
    text = "Hello there, naïve 🌞"
    assert tokenizer.encode(text) == loaded.tokenizer.encode(text)
    assert tokenizer.special_ids == loaded.tokenizer.special_ids
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize("folder", ["hf_dir", "hf_bin_dir"])
def test_hf_gpt2_logits_match_transformers(hf_model, folder: str, request) -> None:
    loaded = load_model(request.getfixturevalue(folder))
    assert not loaded.tokenizer.is_chat_format
    assert loaded.config.block_size == 64 and loaded.config.n_embd == 64
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        expected = hf_model(idx).logits
    torch.testing.assert_close(loaded.model(idx)[0], expected, atol=1e-4, rtol=1e-4)


def test_hf_gpt2_greedy_generation_matches_transformers(hf_model, hf_dir: Path) -> None:
    loaded = load_model(hf_dir)
    prompt = loaded.tokenizer.encode("Hello, my dog is cute and")
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, num_beams=1, max_new_tokens=12, pad_token_id=50256,
        )
    expected = out[0, len(prompt):].tolist()
    ours = list(generate_tokens(loaded.model, prompt, GREEDY))
    assert ours == expected[: len(ours)]
    assert len(ours) == 12 or expected[len(ours)] == loaded.tokenizer.eos_id


def test_export_round_trips_through_transformers(make_model, gpt2_tokenizer, tmp_path: Path) -> None:
    model = make_model(vocab_size=50257, block_size=32)
    export_gpt2(model, gpt2_tokenizer, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Export me: naïve 🙂\n\n  ok?"
    assert hf_tokenizer(text)["input_ids"] == gpt2_tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == 50256
    # and back into our loader
    again = load_model(tmp_path)
    torch.testing.assert_close(again.model(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_export_with_our_chat_tokenizer(make_model, chat_tokenizer, tmp_path: Path) -> None:
    model = make_model()
    export_gpt2(model, chat_tokenizer, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer("Hello there!")["input_ids"] == chat_tokenizer.encode("Hello there!")
    assert hf_tokenizer.eos_token_id == chat_tokenizer.eos_id
    again = load_model(tmp_path)
    assert again.tokenizer.turn("user", "Hi") == chat_tokenizer.turn("user", "Hi")


@pytest.mark.parametrize(("overrides", "reason"), [
    (dict(pos_encoding="sinusoidal"), "learned positions"),
    (dict(bias=False), "biases"),
])
def test_export_refuses_what_gpt2_cannot_hold(make_model, chat_tokenizer, tmp_path: Path,
                                               overrides: dict, reason: str) -> None:
    with pytest.raises(CheckpointError, match=reason):
        export_gpt2(make_model(**overrides), chat_tokenizer, tmp_path)


def test_wrong_shape_names_the_tensor(ours_dir: Path) -> None:
    path = ours_dir / "model.safetensors"
    state = load_file(str(path))
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 32)
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight: "
                                              r"expected \[128, 32\], got \[64, 32\]"):
        load_model(ours_dir)


def test_missing_and_unexpected_tensors_are_named(ours_dir: Path) -> None:
    path = ours_dir / "model.safetensors"
    state = load_file(str(path))
    del state["transformer.h.0.attn.c_attn.bias"]
    state["transformer.h.0.attn.rotary"] = torch.zeros(3)
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_model(ours_dir)
    assert "missing tensors: transformer.h.0.attn.c_attn.bias" in str(info.value)
    assert "unexpected tensors: transformer.h.0.attn.rotary" in str(info.value)


def test_missing_files_are_reported(ours_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (ours_dir / "tokenizer.json").rename(ours_dir / "tokenizer.json.bak")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_model(ours_dir)
    (ours_dir / "tokenizer.json.bak").rename(ours_dir / "tokenizer.json")
    (ours_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing weights file .*model.safetensors"):
        load_model(ours_dir)
    (ours_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(ours_dir)


def test_unknown_config_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    expected = r"\['MambaForCausalLM'\] is not supported; supported: our checkpoint folders, GPT-2.*LlamaForCausalLM"
    with pytest.raises(CheckpointError, match=expected):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match=expected):
        load_tokenizer(tmp_path)


def test_hf_settings_we_cannot_reproduce_are_reported(hf_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(hf_dir, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        load_model(folder)


def test_hf_untied_head_is_reported(hf_bin_dir: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(hf_bin_dir, tmp_path / "hf"))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="tied embeddings"):
        load_model(folder)


def test_hf_without_tokenizer_is_reported(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="vocab.json"):
        load_model(tmp_path)
