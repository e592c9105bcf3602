"""Llama-family models in our GPT and engine: HF folders and GGUF files of tiny random LlamaForCausalLM
and Qwen2ForCausalLM give transformers' logits and greedy tokens, alone and in a busy batch."""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, LoadedModel, load_model, load_tokenizer, save_checkpoint
from model.engine import InferenceEngine
from model.generate import SamplingParams, generate_tokens

from fakes.llama_family import save_tiny_llama, write_gguf

transformers = pytest.importorskip("transformers")

FAMILIES = {
    # Llama 3.2's shape: a separate LM head, rotary scaling; Qwen2.5's: q/k/v biases, a tied head
    "llama": dict(family="llama", rope_scaling="llama3"),
    "qwen2": dict(family="qwen2"),
}
GREEDY = SamplingParams(temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=24)


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp(request.param) / "hf", **FAMILIES[request.param])


@pytest.fixture(scope="module")
def theirs(hf_folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 90)]


def their_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, the whole context run again each step: nothing shared with our code."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def assert_same_logits(ours: LoadedModel, theirs: torch.nn.Module) -> None:
    idx = torch.tensor(prompts()[3:5:1][0:1] * 2)  # (2, 40)
    with torch.no_grad():
        expected = theirs(idx).logits
        got, _ = ours.model(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_an_hf_folder_gives_transformers_logits(hf_folder: Path, theirs: torch.nn.Module) -> None:
    loaded = load_model(hf_folder)
    raw = json.loads((hf_folder / "config.json").read_text())
    assert loaded.config.tie_embeddings == raw["tie_word_embeddings"]
    assert loaded.config.n_kv_head == 2 and loaded.config.n_head == 4
    assert loaded.tokenizer.chat_template is not None and loaded.tokenizer.eos_token == "<|im_end|>"
    assert_same_logits(loaded, theirs)


def test_cached_decoding_gives_transformers_logits_at_every_position(hf_folder: Path, theirs: torch.nn.Module) -> None:
    loaded = load_model(hf_folder)
    ids = prompts()[3]
    cache = loaded.model.new_kv_cache()
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
        prefix, _ = loaded.model(torch.tensor([ids[:30]]), kv_cache=cache)
        steps = [loaded.model(torch.tensor([[t]]), kv_cache=cache, start_pos=30 + i)[0][0, 0] for i, t in enumerate(ids[30:])]
    torch.testing.assert_close(torch.cat([prefix[0], torch.stack(steps)]), expected, rtol=1e-4, atol=1e-4)


def test_a_sharded_folder_loads_the_same(tmp_path: Path, hf_folder: Path, theirs: torch.nn.Module) -> None:
    family = "qwen2" if "qwen2" in str(hf_folder) else "llama"
    sharded = save_tiny_llama(tmp_path / "sharded", **FAMILIES[family], max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert_same_logits(load_model(sharded), theirs)


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_a_gguf_file_gives_transformers_logits(tmp_path: Path, hf_folder: Path, theirs: torch.nn.Module,
                                               qtype: str) -> None:
    path = write_gguf(hf_folder, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    loaded = load_model(path)
    assert loaded.tokenizer.chat_template is not None and loaded.tokenizer.eos_token == "<|im_end|>"
    tokenizer, config = load_tokenizer(path)  # metadata only, for a bot whose model runs elsewhere
    assert config == loaded.config and tokenizer.encode("Hello there") == loaded.tokenizer.encode("Hello there")
    if qtype == "F32":
        assert_same_logits(loaded, theirs)
    else:  # the weights themselves rounded to half precision: close, not equal
        idx = torch.tensor([prompts()[3]])
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(idx)[0], theirs(idx).logits, rtol=0, atol=0.05)


def test_quantized_gguf_files_give_transformers_gguf_logits(tmp_path: Path, hf_folder: Path) -> None:
    """Every block layout: our dequantized weights give the logits of transformers' own GGUF loader
    (which leaves Llama 3's rotary scaling out: this model has none)."""
    family = "qwen2" if "qwen2" in str(hf_folder) else "llama"
    plain = save_tiny_llama(tmp_path / "plain", family=family, seed=1)
    for qtype in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"):
        path = write_gguf(plain, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
        assert_same_logits(load_model(path), theirs.eval())


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_greedy_tokens_equal_transformers_alone_and_in_a_busy_engine_batch(hf_folder: Path, theirs: torch.nn.Module,
                                                                          source: str, tmp_path: Path) -> None:
    path = hf_folder if source == "hf" else write_gguf(hf_folder, tmp_path / "tiny.gguf", qtype="F32")
    loaded = load_model(path)
    expected = [their_greedy(theirs, p, GREEDY.max_new_tokens) for p in prompts()]
    with torch.inference_mode():
        assert [list(generate_tokens(loaded.model, p, GREEDY)) for p in prompts()] == expected

    async def serve() -> tuple[list[list[int]], list[list[int]]]:
        engine = InferenceEngine(loaded, max_batch=3, prefill_chunk=16)  # packed C kernels on CPU
        try:
            async def one(prompt: list[int], delay: float) -> list[int]:
                await asyncio.sleep(delay)
                return [t async for t in engine.stream_tokens(prompt, GREEDY)]

            alone = [await one(p, 0) for p in prompts()]
            together = await asyncio.gather(*(one(p, 0.002 * i) for i, p in enumerate(prompts())))
            return alone, list(together)
        finally:
            engine.close()

    alone, together = asyncio.run(serve())
    assert alone == expected
    assert together == expected


def test_a_conversations_next_turn_reuses_its_cache_and_gives_a_fresh_prefills_tokens(hf_folder: Path) -> None:
    loaded = load_model(hf_folder)
    first = prompts()[2]

    async def turns() -> tuple[list[int], list[int], int]:
        engine = InferenceEngine(loaded, max_batch=2)
        try:
            reply = [t async for t in engine.stream_tokens(first, GREEDY, cache_key="c")]
            second = first + reply + [5, 6, 7]
            again = [t async for t in engine.stream_tokens(second, GREEDY, cache_key="c")]
            return second, again, engine.stats().reused_tokens
        finally:
            engine.close()

    second, again, reused = asyncio.run(turns())
    with torch.inference_mode():
        assert again == list(generate_tokens(loaded.model, second, GREEDY))
    assert reused == len(first) + GREEDY.max_new_tokens - 1


def test_our_checkpoint_keeps_every_option(tmp_path: Path, hf_folder: Path) -> None:
    loaded = load_model(hf_folder)
    save_checkpoint(tmp_path / "ours", loaded.model, loaded.tokenizer, meta={"name": "tiny"})
    again = load_model(tmp_path / "ours")
    assert again.config == loaded.config
    idx = torch.tensor([prompts()[3]])
    with torch.no_grad():
        assert torch.equal(again.model(idx)[0], loaded.model(idx)[0])


def test_max_context_caps_a_rotary_models_window(hf_folder: Path) -> None:
    assert load_model(hf_folder).config.block_size == 128
    assert load_model(hf_folder, max_context=64).config.block_size == 64


def test_settings_our_network_cannot_reproduce_are_one_line_errors(tmp_path: Path, hf_folder: Path) -> None:
    folder = Path(shutil.copytree(hf_folder, tmp_path / "odd"))
    config = json.loads((folder / "config.json").read_text())
    for change, expected in (({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                             ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=expected) as error:
            load_model(folder)
        assert "\n" not in str(error.value)
