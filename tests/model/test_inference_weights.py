"""The engine's float32 weights on CPU: a large model's layers get the compiled one-row kernel, same results."""

import logging

import pytest
import torch

from model import inference_weights
from model.config import GPTConfig
from model.generate import SamplingParams, generate_tokens
from model.gpt import GPT
from model.inference_weights import InputMajorLinear, RowKernelLinear, prepare

WIDE = GPTConfig(vocab_size=1024, block_size=64, n_layer=1, n_head=8, n_embd=512)  # 14 MiB of Linear weights
LARGE = 8 * 2**20  # the size from which these tests call a model large (the default is 64 MiB)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(WIDE).eval()


@pytest.fixture(scope="module")
def prepared(model):
    return prepare(model, "float32", row_kernel_min_bytes=LARGE)


def test_a_large_models_layers_get_the_row_kernel_and_share_the_weights(model, prepared):
    kernel_layers = {name for name, m in prepared.named_modules() if isinstance(m, RowKernelLinear)}
    assert kernel_layers == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                             "transformer.h.0.mlp.c_proj", "lm_head"}
    assert prepared.lm_head.weight is model.transformer.wte.weight  # tied, and no copy
    assert not any(isinstance(m, RowKernelLinear) for m in model.modules())  # the original is left as it was


def test_a_model_whose_weights_fit_the_cache_stores_its_wide_layers_input_major(model):
    small = prepare(model, "float32")  # 14 < 64 MiB
    assert not any(isinstance(m, RowKernelLinear) for m in small.modules())
    wide = {name for name, m in small.named_modules() if isinstance(m, InputMajorLinear)}
    assert wide == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                    "lm_head"}  # out >= in: all but the MLP's c_proj
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(small(x)[0], model(x)[0], rtol=1e-4, atol=1e-5)


def test_one_row_and_many_rows_give_nn_linears_results(model, prepared):
    layer, reference = prepared.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_fc
    with torch.inference_mode():
        one = torch.randn(1, 1, 512)
        torch.testing.assert_close(layer(one), reference(one), rtol=1e-4, atol=1e-5)
        many = torch.randn(3, 5, 512)
        assert torch.equal(layer(many), reference(many))


def test_greedy_decoding_gives_the_same_tokens(model, prepared):
    params = SamplingParams(temperature=0, max_new_tokens=20)
    with torch.inference_mode():
        assert list(generate_tokens(prepared, [5, 6, 7], params)) == list(generate_tokens(model, [5, 6, 7], params))


def test_without_a_compiler_the_layers_stay_plain_and_work(model, monkeypatch, caplog):
    def no_compiler(fn, **options):
        def fails(*args):
            raise RuntimeError("no C++ compiler")
        return fails

    monkeypatch.setattr(inference_weights.torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="model.inference_weights"):
        plain = prepare(model, "float32", row_kernel_min_bytes=LARGE)
    assert "could not be compiled (no C++ compiler)" in caplog.text
    assert not any(isinstance(m, RowKernelLinear) for m in plain.modules())
    x = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(plain(x)[0], model(x)[0])


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
