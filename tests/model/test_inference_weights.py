"""The engine's float32 weights on CPU: packed, with cpu_kernels' products; the fallback's oneDNN and MKL; same results."""

import copy
import logging

import pytest
import torch
from torch.nn import functional as F

from model import cpu_kernels, inference_weights
from model.cpu_kernels import PackedEmbedding, PackedLinear, RowStepBlock
from model.config import GPTConfig
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import CpuLinear, prepare

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


def linears(model: torch.nn.Module, kind: type) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def test_every_linear_is_packed_and_every_block_steps_in_c(model, prepared):
    layers = linears(prepared, PackedLinear)
    assert set(layers) == {name.replace(".h.0.", ".h.0.block.") for name in LINEARS}
    assert all(isinstance(block, RowStepBlock) for block in prepared.transformer.h)
    assert torch.equal(prepared.lm_head.packed, cpu_kernels.pack(model.transformer.wte.weight))  # the tied head packed
    assert prepared.transformer.wpe.weight is model.transformer.wpe.weight  # the rest shared
    assert isinstance(prepared.transformer.wte, PackedEmbedding)  # the embedding read from the head's copy
    assert prepared.transformer.wte.weight is prepared.lm_head.packed
    assert not linears(model, PackedLinear) and not isinstance(model.transformer.h[0], RowStepBlock)  # the original as it was


def test_the_packed_embedding_gives_the_embeddings_rows(model, prepared):
    ids = torch.tensor([[0, 15, 16, 17], [500, 1000, 1023, 1008]])  # panels' edges, the last token
    with torch.inference_mode():
        assert torch.equal(prepared.transformer.wte(ids), model.transformer.wte(ids))


def test_an_untied_head_is_packed_and_the_embedding_kept(model):
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone() * 2)
    packed = prepare(untied, "float32")
    assert isinstance(packed.transformer.wte, torch.nn.Embedding)
    assert packed.transformer.wte.weight is untied.transformer.wte.weight
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(packed(x)[0], untied(x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [(1, 1), (2, 3), (8, 1), (9, 1), (3, 5), (16, 1), (17, 1), (7, 11)])
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


@pytest.fixture
def without_kernels(monkeypatch, tmp_path):
    """prepare as on a machine with no C compiler."""
    cpu_kernels.library.cache_clear()
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    yield
    cpu_kernels.library.cache_clear()


@pytest.mark.parametrize("rows", [(1, 1), (3, 5), (17, 1)])  # MKL for one row; oneDNN, 17 padded to 18
def test_without_the_kernels_layers_use_onednn_and_mkl_with_the_same_results(model, without_kernels, rows):
    plain = prepare(model, "float32")
    layers = linears(plain, CpuLinear)
    assert set(layers) == LINEARS and all(m.product is inference_weights._onednn_product for m in layers.values())
    assert plain.lm_head.weight.t().is_contiguous()  # MKL's faster layout for one row
    assert plain.transformer.h[0].mlp.c_proj.weight is model.transformer.h[0].mlp.c_proj.weight  # narrowing: shared
    for name in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn"):
        with torch.inference_mode():
            x = torch.randn(*rows, WIDE.n_embd * (4 if name == "mlp.c_proj" else 1))
            torch.testing.assert_close(plain.get_submodule(f"transformer.h.0.{name}")(x),
                                       model.get_submodule(f"transformer.h.0.{name}")(x), rtol=1e-4, atol=1e-5)


def test_without_onednn_the_layers_use_nn_linears_product(model, without_kernels, monkeypatch, caplog):
    def missing(*args):
        raise RuntimeError("mkldnn::_linear_pointwise: no such operator\nmore detail")

    monkeypatch.setattr(inference_weights, "_onednn_product", missing)
    with caplog.at_level(logging.WARNING, logger="model.inference_weights"):
        plain = prepare(model, "float32")
    assert "oneDNN's matrix product is not usable (mkldnn::_linear_pointwise: no such operator)" in caplog.text
    assert all(m.product is F.linear for m in linears(plain, CpuLinear).values())
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(plain(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)
