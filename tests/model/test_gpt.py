"""GPTConfig and the GPT network: shapes, causality, KV cache, weight tying and init."""

import math

import pytest
import torch

from model.config import GPTConfig

POS_ENCODINGS = ["learned", "sinusoidal"]


def test_config_round_trips_through_dict() -> None:
    config = GPTConfig(
        vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=8, dropout=0.1, bias=False,
        pos_encoding="sinusoidal",
    )
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(pos_encoding="rotary"), "pos_encoding"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(pos_encoding="sinusoidal", n_embd=9, n_head=3), "even n_embd"),
    ],
)
def test_config_rejects_bad_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{"vocab_size": 10, **fields})


def test_config_from_dict_names_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match="n_embed"):
        GPTConfig.from_dict({"vocab_size": 10, "n_embed": 8})
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig.from_dict({"n_layer": 2})


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_forward_shapes_and_initial_loss(make_model, pos_encoding: str) -> None:
    model = make_model(pos_encoding=pos_encoding)
    idx = torch.randint(0, 400, (3, 10))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, 400)
    # small init: near-uniform predictions, so the loss starts near ln(vocab)
    assert abs(loss.item() - math.log(400)) < 0.5
    assert model(idx)[1] is None


def test_loss_ignores_targets_of_minus_100(make_model) -> None:
    model = make_model()
    idx = torch.randint(0, 400, (1, 8))
    targets = idx.clone()
    targets[0, :4] = -100
    logits, loss = model(idx, targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_future_tokens_do_not_change_past_logits(make_model, pos_encoding: str) -> None:
    model = make_model(pos_encoding=pos_encoding)
    a = torch.randint(0, 400, (1, 12))
    b = a.clone()
    b[0, 7:] = torch.randint(0, 400, (5,))
    torch.testing.assert_close(model(a)[0][:, :7], model(b)[0][:, :7])


@pytest.mark.parametrize("pos_encoding", POS_ENCODINGS)
def test_kv_cache_decode_matches_full_forward(make_model, pos_encoding: str) -> None:
    model = make_model(pos_encoding=pos_encoding)
    idx = torch.randint(0, 400, (2, 20))
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    with torch.inference_mode():
        prefill, _ = model(idx[:, :8], kv_cache=cache)  # T > 1 from position 0
        steps = [model(idx[:, t : t + 1], kv_cache=cache, start_pos=t)[0] for t in range(8, 20)]
    torch.testing.assert_close(prefill, full[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], atol=1e-5, rtol=1e-5)


def test_kv_cache_prefill_after_cached_tokens_is_causal(make_model) -> None:
    """T > 1 new tokens at start_pos > 0 (a new message after a cached history)."""
    model = make_model()
    idx = torch.randint(0, 400, (1, 24))
    full, _ = model(idx)
    cache = model.new_kv_cache()
    with torch.inference_mode():
        model(idx[:, :10], kv_cache=cache)
        chunk, _ = model(idx[:, 10:17], kv_cache=cache, start_pos=10)
        rest, _ = model(idx[:, 17:], kv_cache=cache, start_pos=17)
    torch.testing.assert_close(chunk, full[:, 10:17], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[:, 17:], atol=1e-5, rtol=1e-5)


def test_kv_cache_is_preallocated_per_layer(make_model) -> None:
    model = make_model(n_layer=3, block_size=16, n_head=2, n_embd=32)
    cache = model.new_kv_cache(batch_size=2, dtype=torch.float64)
    assert len(cache.k) == len(cache.v) == 3
    assert cache.k[0].shape == (2, 2, 16, 16)
    assert cache.k[0].dtype == torch.float64


def test_positions_past_block_size_are_rejected(make_model) -> None:
    model = make_model(block_size=8)
    with pytest.raises(ValueError, match="block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size 8"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=model.new_kv_cache(), start_pos=7)
    with pytest.raises(ValueError, match="kv_cache"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=3)


def test_lm_head_is_tied_and_counted_once(make_model) -> None:
    model = make_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    c = model.config
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd  # attn + mlp weights and biases, two LayerNorms
    expected = c.vocab_size * c.n_embd + c.block_size * c.n_embd + c.n_layer * per_block
    assert model.num_params() == expected + 2 * c.n_embd  # + final LayerNorm


def test_sinusoidal_positions_are_fixed_and_not_saved(make_model) -> None:
    model = make_model(pos_encoding="sinusoidal")
    assert not any("wpe" in name for name, _ in model.named_parameters())
    assert not any("wpe" in name for name in model.state_dict())
    table = model.transformer.wpe.table
    # position 0: sin(0) = 0 in even channels, cos(0) = 1 in odd ones
    assert torch.equal(table[0, 0::2], torch.zeros(16))
    assert torch.equal(table[0, 1::2], torch.ones(16))


def test_bias_false_has_no_biases(make_model) -> None:
    model = make_model(bias=False)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


def test_init_follows_gpt2(make_model) -> None:
    model = make_model(n_layer=8, n_embd=128, n_head=4)
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0


def test_dropout_only_in_training(make_model) -> None:
    model = make_model(dropout=0.5)
    idx = torch.randint(0, 400, (1, 8))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


def test_a_few_steps_of_training_lower_the_loss(make_model) -> None:
    model = make_model().train()
    idx = torch.randint(0, 400, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
