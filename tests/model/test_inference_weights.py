"""The engine's float32 weights on CPU: oneDNN's product for several rows, a one-row path chosen by size, same results."""

import logging

import pytest
import torch
from torch.nn import functional as F

from model import inference_weights, row_step
from model.config import GPTConfig
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import CpuLinear, prepare
from model.row_step import RowStepBlock

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


def test_a_large_model_gets_onednn_compiled_row_steps_and_shares_the_weights(model, prepared):
    layers = cpu_linears(prepared)
    assert set(layers) == {name.replace(".h.0.", ".h.0.block.") for name in LINEARS}
    assert all(m.product is inference_weights._onednn_product for m in layers.values())
    assert all(m.one_row is F.linear for name, m in layers.items() if name != "lm_head")  # blocks: see row_step
    assert prepared.lm_head.one_row is row_step.compiled_steps().head
    assert all(isinstance(block, RowStepBlock) for block in prepared.transformer.h)
    assert prepared.lm_head.weight is model.transformer.wte.weight  # tied, and no copy
    assert not cpu_linears(model) and not isinstance(model.transformer.h[0], RowStepBlock)  # the original as it was


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
        layer = prepared.get_submodule(f"transformer.h.0.block.{name}")  # in its RowStepBlock
        reference = model.get_submodule(f"transformer.h.0.{name}")
        with torch.inference_mode():
            x = torch.randn(*rows, reference.in_features)
            torch.testing.assert_close(layer(x), reference(x), rtol=1e-4, atol=1e-5)


def test_greedy_decoding_gives_the_same_tokens(model, prepared):
    params = SamplingParams(temperature=0, max_new_tokens=20)
    with torch.inference_mode():
        expected = list(generate_tokens(model, [5, 6, 7], params))
        assert list(generate_tokens(prepared, [5, 6, 7], params)) == expected
        assert list(generate_tokens(prepare(model, "float32"), [5, 6, 7], params)) == expected


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


def test_a_second_models_shapes_make_the_kernels_dynamic_so_no_later_model_compiles_again(model, prepared):
    """Past dynamo's recompile limit the steps would run eagerly, many times slower: models must not add compiles."""
    shapes = [GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=4, n_embd=384),
              GPTConfig(vocab_size=1500, block_size=48, n_layer=1, n_head=6, n_embd=192, bias=False)]
    torch.manual_seed(1)
    models = [GPT(config).eval() for config in shapes]
    second = prepare(models[0], "float32", row_kernel_min_bytes=2**20)  # may compile: sizes become dynamic
    torch._dynamo.utils.counters.clear()
    third = prepare(models[1], "float32", row_kernel_min_bytes=2**20)
    params = SamplingParams(temperature=0, max_new_tokens=6)
    with torch.inference_mode():
        for original, ours in zip([model, *models], [prepared, second, third]):
            assert list(generate_tokens(ours, [4, 5], params)) == list(generate_tokens(original, [4, 5], params))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
