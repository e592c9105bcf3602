"""Weights kept quantized in memory (precisions q8 and q4): the C products against a plain PyTorch
dequantize-then-multiply reference, GGUF's Q8_0 and Q4_1 kept exactly, and the same greedy tokens
alone and inside a busy batch."""

import ctypes

import gguf
import numpy as np
import pytest
import torch

from model import cpu_kernels
from conftest import BatchedTokens
from model.config import GPTConfig
from model.cpu_kernels import QK, PackedEmbedding, PackedLinear, unpack
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import prepare

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.2, max_new_tokens=40)
LLAMA = GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=4, n_embd=96, pos_encoding="rope",
                  norm="rmsnorm", mlp="swiglu", n_kv_head=2, n_inner=136, bias=False, qkv_bias=True)


QUANTIZED = pytest.mark.parametrize("precision", ["q8", "q4"])


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def reference_weight(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """Each output's runs of 32 inputs rounded, in plain PyTorch: q8 to 255 levels of its largest
    magnitude, q4 to 16 levels from its least to its largest, scales and minimums in half precision."""
    out_features, in_features = weight.shape
    result = torch.empty_like(weight)
    for start in range(0, in_features, QK):
        run = weight[:, start : start + QK]
        if precision == "q8":
            scale = half(run.abs().amax(dim=1, keepdim=True) / 127)
            rounded = torch.where(scale > 0, torch.round(run / scale).clamp(-127, 127) * scale, 0)
        else:
            least = half(run.amin(dim=1, keepdim=True))
            scale = half((run.amax(dim=1, keepdim=True) - least) / 15)
            rounded = torch.where(scale > 0, torch.round((run - least) / scale).clamp(0, 15) * scale, 0) + least
        result[:, start : start + QK] = rounded
    return result


def reference_input(x: torch.Tensor) -> torch.Tensor:
    """Each row's runs of 32 inputs as the integer products take them: 255 levels of its largest magnitude."""
    result = torch.empty_like(x)
    for start in range(0, x.size(-1), QK):
        run = x[..., start : start + QK]
        scale = run.abs().amax(dim=-1, keepdim=True) / 127
        inverse = torch.where(scale > 0, 1 / scale, 0)
        result[..., start : start + QK] = torch.round(run * inverse) * scale
    return result


@QUANTIZED
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 40])
def test_products_give_the_dequantized_weights_product_for_odd_sizes(kernels: ctypes.CDLL, rows: int,
                                                                    precision: str) -> None:
    torch.manual_seed(rows)
    # inputs: fewer than a group, a group and one, several groups and a partial one; outputs: a partial panel
    for out_features, in_features in [(1, 1), (3, 17), (16, 32), (33, 33), (80, 100), (1030, 576)]:
        for bias in (True, False):
            linear = torch.nn.Linear(in_features, out_features, bias=bias)
            x = torch.randn(rows, in_features)
            expected = torch.nn.functional.linear(reference_input(x), reference_weight(linear.weight.detach(), precision),
                                                  linear.bias)
            with torch.inference_mode():
                got = PackedLinear(linear, kernels, precision)(x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision, qtype", [("q8", "Q8_0"), ("q4", "Q4_1")])
def test_a_gguf_weight_of_the_same_layout_is_kept_exactly(precision: str, qtype: str) -> None:
    """Weights that were GGUF Q8_0 or Q4_1 (a scale, and a minimum, per 32) come back as they were dequantized."""
    weight = np.random.default_rng(0).normal(size=(48, 96)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    dequantized = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind))
    packed = PackedLinear(_linear_of(dequantized), cpu_kernels.library(), precision)
    torch.testing.assert_close(unpack(packed, torch.arange(48)), dequantized, rtol=1e-5, atol=1e-6)


def _linear_of(weight: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.size(1), weight.size(0), bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


@QUANTIZED
def test_a_tied_embedding_reads_the_8_bit_head(precision: str) -> None:
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=40)).eval()
    prepared = prepare(model, precision)
    assert isinstance(prepared.transformer.wte, PackedEmbedding)
    assert prepared.lm_head.precision == "q8", "in q4 too the output layer keeps 8 bits, as llama.cpp's files"
    ids = torch.tensor([[0, 7, 8, 15, 16, 299]])  # panels' edges
    expected = reference_weight(model.transformer.wte.weight.detach(), "q8")[ids]
    with torch.inference_mode():
        torch.testing.assert_close(prepared.transformer.wte(ids), expected, rtol=1e-5, atol=1e-6)
    assert prepared.transformer.wte.weight.dtype == torch.float32  # what the engine reads for its pools


@QUANTIZED
@pytest.mark.parametrize("config", [GPTConfig(vocab_size=300, block_size=40, n_layer=2, n_head=4, n_embd=96), LLAMA],
                         ids=["gpt2", "llama"])
def test_greedy_tokens_are_the_same_alone_and_inside_a_busy_batch(config: GPTConfig, precision: str,
                                                                  batched_tokens: BatchedTokens) -> None:
    torch.manual_seed(3)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p.normal_(std=0.15)
    prepared = prepare(model, precision)
    assert all(m.precision == precision for m in prepared.transformer.modules() if isinstance(m, PackedLinear))
    prompts = [[5, 6], list(range(40, 75)), [9] * 11, [7]]  # the second slides the 40-token window
    with torch.inference_mode():
        alone = [list(generate_tokens(prepared, p, GREEDY)) for p in prompts]
    assert batched_tokens(prepared, prompts, GREEDY) == alone
    assert all(len(t) == GREEDY.max_new_tokens for t in alone)


def test_without_the_kernels_q4_falls_back_to_float32(monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      tmp_path) -> None:
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        prepared = prepare(model, "q4")
    finally:
        cpu_kernels.library.cache_clear()
    assert "q4 weights need" in caplog.text and "running float32" in caplog.text
    assert not any(isinstance(m, PackedLinear) for m in prepared.modules())
    with torch.inference_mode():
        assert len(list(generate_tokens(prepared, [1, 2, 3], GREEDY))) == GREEDY.max_new_tokens


@pytest.mark.parametrize("qtype, expected", [("F32", "float32"), ("F16", "float32"), ("Q8_0", "q8"), ("Q6_K", "q8"),
                                             ("Q4_1", "q4"), ("Q4_K", "q4")])
def test_auto_keeps_a_gguf_files_own_quantization(tmp_path, qtype: str, expected: str) -> None:
    """And says so: the engine runs what the file holds, float weights as trained."""
    from fakes.llama_family import save_tiny_llama, write_gguf

    from model.checkpoint import load_model
    from model.engine import InferenceEngine

    # 256 inputs a row, so that the K-quants' 256-weight blocks are used rather than a fallback type
    folder = save_tiny_llama(tmp_path / "hf", hidden_size=256, intermediate_size=256)
    loaded = load_model(write_gguf(folder, tmp_path / f"tiny-{qtype}.gguf", qtype=qtype))
    assert loaded.stored_as == qtype
    engine = InferenceEngine(loaded, precision="auto")
    try:
        assert engine.precision == expected
    finally:
        engine.close()
    assert load_model(folder).stored_as == "float32"


@pytest.mark.parametrize("family, qtype, precision", [("llama", "Q4_1", "q4"), ("qwen2", "Q8_0", "q8")])
def test_a_gguf_file_loads_block_by_block_into_its_quantized_layout(tmp_path, family: str, qtype: str,
                                                                   precision: str) -> None:
    """Packed as each block loads (no block is left in float32), the same weights and greedy tokens as a
    float32 load packed afterwards, and the engine completes that model in place."""
    from fakes.llama_family import save_tiny_llama, write_gguf

    from model.checkpoint import load_model
    from model.inference_weights import packing

    path = write_gguf(save_tiny_llama(tmp_path / "hf", family=family), tmp_path / f"tiny-{qtype}.gguf", qtype=qtype)
    seen: list[str] = []

    def pack(block: torch.nn.Module, stored_as: str) -> None:
        packing("auto")(block, stored_as)
        seen.append(stored_as)

    streamed = load_model(path, on_block=pack)
    assert seen == [qtype] * streamed.config.n_layer
    linears = [m for m in streamed.model.transformer.h.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert linears and all(isinstance(m, PackedLinear) and m.precision == precision for m in linears)
    prepared = prepare(streamed.model, precision)
    assert prepared is streamed.model, "a model packed while loading is completed in place, not copied"
    assert prepared.lm_head.precision == "q8"
    afterwards = prepare(load_model(path).model, precision)
    for ours, theirs in zip(prepared.state_dict().items(), afterwards.state_dict().items(), strict=True):
        assert ours[0] == theirs[0] and torch.equal(ours[1], theirs[1]), ours[0]
    with torch.inference_mode():
        assert list(generate_tokens(prepared, [5, 6, 7], GREEDY)) == list(generate_tokens(afterwards, [5, 6, 7], GREEDY))
    with pytest.raises(ValueError, match=f"loaded with {precision} weights"):
        prepare(prepared, "float32")


def test_packing_leaves_float_files_and_float_precisions_in_float32(tmp_path) -> None:
    from fakes.llama_family import save_tiny_llama

    from model.checkpoint import load_model
    from model.inference_weights import packing

    folder = save_tiny_llama(tmp_path / "hf")
    for setting in ("auto", "float32", "bfloat16"):
        loaded = load_model(folder, on_block=packing(setting))
        assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules()), setting
    assert all(isinstance(m, PackedLinear) and m.precision == "q8"
               for m in load_model(folder, on_block=packing("q8")).model.transformer.h[0].attn.modules()
               if isinstance(m, (torch.nn.Linear, PackedLinear)))
