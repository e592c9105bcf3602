"""The engine's float32 weights on CPU: oneDNN's product for several rows, a one-row path chosen by size, same results."""

import logging

import pytest
import torch
from torch.nn import functional as F

from model import inference_weights
from model.config import GPTConfig
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import CpuLinear, prepare

WIDE = GPTConfig(vocab_size=1024, block_size=64, n_layer=1, n_head=8, n_embd=512)  # 14 MiB of Linear weights
LARGE = 8 * 2**20  # the size from which these tests call a model large (the default is 64 MiB)
LINEARS = {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
           "transformer.h.0.mlp.c_proj", "lm_head"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(WIDE).eval()


@pytest.fixture(scope="module")
def prepared(model):
    return prepare(model, "float32", row_kernel_min_bytes=LARGE)


def cpu_linears(model: torch.nn.Module) -> dict[str, CpuLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}


def test_a_large_models_layers_get_onednn_and_the_row_kernel_and_share_the_weights(model, prepared):
    layers = cpu_linears(prepared)
    assert set(layers) == LINEARS
    assert all(m.product is inference_weights._onednn_product for m in layers.values())
    assert all(m.one_row not in (inference_weights._onednn_product, F.linear) for m in layers.values())  # compiled
    assert prepared.lm_head.weight is model.transformer.wte.weight  # tied, and no copy
    assert not cpu_linears(model)  # the original is left as it was


def test_a_model_whose_weights_fit_the_cache_keeps_mkl_for_one_row_with_wide_layers_input_major(model):
    small = prepare(model, "float32")  # 14 < 64 MiB
    layers = cpu_linears(small)
    assert set(layers) == LINEARS
    assert all(m.one_row is F.linear and m.product is inference_weights._onednn_product for m in layers.values())
    wide = {name for name, m in layers.items() if m.weight.t().is_contiguous()}
    assert wide == LINEARS - {"transformer.h.0.mlp.c_proj"}  # out >= in: all but the MLP's c_proj
    assert small.lm_head.weight is not model.transformer.wte.weight  # its own input-major copy
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(small(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(small(x[:, :1])[0], model(x[:, :1])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [(1, 1), (3, 5), (16, 1), (17, 1), (7, 11)])  # 17 and 77 rows are padded
def test_products_give_nn_linears_results(model, prepared, rows):
    for name in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn"):
        layer, reference = prepared.get_submodule(f"transformer.h.0.{name}"), model.get_submodule(f"transformer.h.0.{name}")
        with torch.inference_mode():
            x = torch.randn(*rows, reference.in_features)
            torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)


def test_greedy_decoding_gives_the_same_tokens(model, prepared):
    params = SamplingParams(temperature=0, max_new_tokens=20)
    with torch.inference_mode():
        expected = list(generate_tokens(model, [5, 6, 7], params))
        assert list(generate_tokens(prepared, [5, 6, 7], params)) == expected
        assert list(generate_tokens(prepare(model, "float32"), [5, 6, 7], params)) == expected


def test_without_a_compiler_one_row_uses_the_matrix_product(model, monkeypatch, caplog):
    def no_compiler(fn, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler")
        return fails

    monkeypatch.setattr(inference_weights.torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="model.inference_weights"):
        plain = prepare(model, "float32", row_kernel_min_bytes=LARGE)
    assert "could not be compiled (no C++ compiler)" in caplog.text
    assert all(m.one_row is F.linear for m in cpu_linears(plain).values())
    assert plain.lm_head.weight is model.transformer.wte.weight  # a large model gets no input-major copies
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)


def test_without_onednn_the_layers_use_nn_linears_product(model, monkeypatch, caplog):
    def missing(*args):
        raise RuntimeError("mkldnn::_linear_pointwise: no such operator\nmore detail")

    monkeypatch.setattr(inference_weights, "_onednn_product", missing)
    with caplog.at_level(logging.WARNING, logger="model.inference_weights"):
        plain = prepare(model, "float32")
    assert "oneDNN's matrix product is not usable (mkldnn::_linear_pointwise: no such operator)" in caplog.text
    assert all(m.product is F.linear for m in cpu_linears(plain).values())
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)


def test_the_kernel_is_compiled_once_for_every_shape_and_model(model, prepared):
    """Past dynamo's recompile limit the kernel would run eagerly, many times slower: shapes must not add compiles."""
    torch.manual_seed(1)
    other = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=384)).eval()
    torch._dynamo.utils.counters.clear()
    again = prepare(other, "float32", row_kernel_min_bytes=2**20)
    with torch.inference_mode():
        for _ in range(3):
            again(torch.tensor([[1, 2, 3]]))
            prepared(torch.tensor([[4]]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
