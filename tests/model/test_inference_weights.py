"""The engine's float32 weights on CPU: oneDNN's product for several rows, row_step's for one, same results."""

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

WIDE = GPTConfig(vocab_size=1024, block_size=64, n_layer=1, n_head=8, n_embd=512)
LINEARS = {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
           "transformer.h.0.mlp.c_proj", "lm_head"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(WIDE).eval()


@pytest.fixture(scope="module")
def prepared(model):
    return prepare(model, "float32")


def cpu_linears(model: torch.nn.Module) -> dict[str, CpuLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CpuLinear)}


def test_layers_get_onednn_and_row_steps_and_share_the_weights(model, prepared):
    layers = cpu_linears(prepared)
    assert set(layers) == {name.replace(".h.0.", ".h.0.block.") for name in LINEARS}
    assert all(m.product is inference_weights._onednn_product for m in layers.values())
    assert all(m.few.func is row_step.row_product and m.few_rows == inference_weights.FEW_ROWS for m in layers.values())
    assert all(isinstance(block, RowStepBlock) for block in prepared.transformer.h)
    assert prepared.lm_head.weight is model.transformer.wte.weight  # tied, and no copy
    assert not cpu_linears(model) and not isinstance(model.transformer.h[0], RowStepBlock)  # the original as it was


@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (8, 1), (9, 1), (3, 5), (16, 1), (17, 1), (7, 11)])  # 17, 77 padded
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
