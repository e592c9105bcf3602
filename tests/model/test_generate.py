"""Sampling functions and generation: cache vs no cache, seeds, stops, long prompts, streaming."""

import pytest
import torch

from model.generate import (
    SamplingParams,
    apply_repetition_penalty,
    generate_tokens,
    logits_to_probs,
    sample,
    stream_text,
    top_p_filter,
)

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=20)


@pytest.fixture
def gpt2_vocab_model(make_model):
    """A tiny random model over the GPT-2 vocabulary, for tests that decode text."""
    return make_model(vocab_size=50257, block_size=48, n_embd=32, n_head=2, n_layer=2)


def test_sampling_params_are_validated() -> None:
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5),
                dict(repetition_penalty=0), dict(max_new_tokens=-1), dict(stop_strings=("",)),
                dict(seed=-1), dict(seed=2**64)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # sorted, as top_p_filter expects
    assert torch.isfinite(top_p_filter(probs.log(), 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(probs.log(), 0.81)).tolist() == [True, True, True, False]
    # the most likely token always survives
    assert torch.isfinite(top_p_filter(probs.log(), 0.01)).tolist() == [True, False, False, False]


def test_repetition_penalty_pushes_seen_tokens_down() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, [0, 1, 0], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]  # input untouched


def test_logits_to_probs() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    assert logits_to_probs(logits, GREEDY, []).tolist() == [0.0, 1.0, 0.0, 0.0]
    plain = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    torch.testing.assert_close(logits_to_probs(logits, plain, []), torch.softmax(logits, -1))
    hot = SamplingParams(temperature=0.5, top_k=0, top_p=1.0, repetition_penalty=1.0)
    torch.testing.assert_close(logits_to_probs(logits, hot, []), torch.softmax(logits / 0.5, -1))
    top2 = logits_to_probs(logits, SamplingParams(temperature=0.5, top_k=2, top_p=1.0), [])
    assert (top2 > 0).tolist() == [False, True, False, True]
    torch.testing.assert_close(top2[[1, 3]], torch.softmax(torch.tensor([6.0, 4.0]), -1))
    # top_p over the softmax of [3, 2, 1, 0]: 0.64 + 0.24 reaches 0.8
    nucleus = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.8), [])
    assert (nucleus > 0).tolist() == [False, True, False, True]
    penalised = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert logits_to_probs(logits, penalised, [1]).argmax().item() == 3


def test_sample_follows_the_generator() -> None:
    probs = torch.full((10,), 0.1)
    draws = [sample(probs, torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(draws)) == 1


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_kv_cache_greedy_equals_recomputation(make_model, pos_encoding: str) -> None:
    model = make_model(pos_encoding=pos_encoding, block_size=16)
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=40)
    prompt = [5, 17, 99, 3, 250]
    # 40 new tokens in a 16-token window: the context slides several times
    cached = list(generate_tokens(model, prompt, params))
    recomputed = list(generate_tokens(model, prompt, params, use_cache=False))
    assert len(cached) == 40
    assert cached == recomputed


def test_greedy_picks_the_argmax_each_step(make_model) -> None:
    model = make_model()
    prompt = [1, 2, 3]
    tokens = list(generate_tokens(model, prompt, GREEDY))
    context = list(prompt)
    for token in tokens[:5]:
        logits, _ = model(torch.tensor([context]))
        assert token == logits[0, -1].argmax().item()
        context.append(token)


def test_seed_makes_sampling_reproducible(make_model) -> None:
    model = make_model()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30, seed=7)
    first = list(generate_tokens(model, [1, 2, 3], params))
    assert first == list(generate_tokens(model, [1, 2, 3], params))
    other = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=30, seed=8)
    assert first != list(generate_tokens(model, [1, 2, 3], other))


def test_top_k_1_equals_greedy(make_model) -> None:
    model = make_model()
    params = SamplingParams(temperature=1.3, top_k=1, repetition_penalty=1.0, max_new_tokens=20)
    greedy = list(generate_tokens(model, [4, 5], GREEDY))
    assert list(generate_tokens(model, [4, 5], params)) == greedy


def test_stop_ids_end_generation_without_being_yielded(make_model) -> None:
    model = make_model()
    tokens = list(generate_tokens(model, [7, 8, 9], GREEDY))
    stop = tokens[5]
    first = tokens.index(stop)
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=20,
                            stop_ids=(stop, 123456))
    assert list(generate_tokens(model, [7, 8, 9], params)) == tokens[:first]


def test_max_new_tokens(make_model) -> None:
    model = make_model()
    for n in (0, 1, 7):
        params = SamplingParams(max_new_tokens=n, seed=0)
        assert len(list(generate_tokens(model, [1], params))) == n


def test_prompt_longer_than_block_size_keeps_its_newest_tokens(make_model) -> None:
    model = make_model(block_size=16)
    long_prompt = list(range(100, 150))
    tokens = list(generate_tokens(model, long_prompt, GREEDY))
    assert len(tokens) == 20
    assert tokens == list(generate_tokens(model, long_prompt[-15:], GREEDY))
    with pytest.raises(ValueError, match="empty"):
        list(generate_tokens(model, [], GREEDY))


def test_stream_text_equals_decoding_the_tokens(gpt2_vocab_model, gpt2_tokenizer) -> None:
    prompt = gpt2_tokenizer.encode("Hello, how are you?")
    params = SamplingParams(max_new_tokens=30, seed=1)
    tokens = list(generate_tokens(gpt2_vocab_model, prompt, params))
    if gpt2_tokenizer.eos_id in tokens:
        tokens = tokens[: tokens.index(gpt2_tokenizer.eos_id)]
    pieces = list(stream_text(gpt2_vocab_model, gpt2_tokenizer, prompt, params))
    assert "".join(pieces) == gpt2_tokenizer.decode(tokens)
    assert all(pieces)


def _swap_tokens(model, a: int, b: int) -> None:
    """Swap two rows of the (tied) embedding: the model then says a where it said b."""
    wte = model.transformer.wte.weight
    with torch.no_grad():
        wte[[a, b]] = wte[[b, a]]


def test_stream_text_stops_at_eos(gpt2_vocab_model, gpt2_tokenizer) -> None:
    prompt = gpt2_tokenizer.encode("Tell me a story.")
    tokens = list(generate_tokens(gpt2_vocab_model, prompt, GREEDY))
    eos, fourth = gpt2_tokenizer.eos_id, tokens[3]
    first = tokens.index(fourth)
    assert eos not in prompt + tokens
    _swap_tokens(gpt2_vocab_model, eos, fourth)
    assert list(generate_tokens(gpt2_vocab_model, prompt, GREEDY))[first] == eos
    text = "".join(stream_text(gpt2_vocab_model, gpt2_tokenizer, prompt, GREEDY))
    assert text == gpt2_tokenizer.decode(tokens[:first])


def test_stream_text_stops_when_the_model_opens_a_turn(make_model, chat_tokenizer) -> None:
    model = make_model()
    prompt = [*chat_tokenizer.turn("user", "Hello there!"), *chat_tokenizer.reply_prefix()]
    tokens = list(generate_tokens(model, prompt, GREEDY))
    user = chat_tokenizer.turn("user", "")[0]
    fourth = tokens[3]
    first = tokens.index(fourth)
    assert not set(tokens[:first]) & chat_tokenizer.special_ids
    _swap_tokens(model, user, fourth)
    prompt = [user if t == fourth else fourth if t == user else t for t in prompt]
    assert list(generate_tokens(model, prompt, GREEDY))[first] == user
    text = "".join(stream_text(model, chat_tokenizer, prompt, GREEDY))
    assert text == chat_tokenizer.decode(tokens[:first])


def test_stream_text_stops_before_a_stop_string(gpt2_vocab_model, gpt2_tokenizer) -> None:
    prompt = gpt2_tokenizer.encode("Once upon a time")
    tokens = list(generate_tokens(gpt2_vocab_model, prompt, GREEDY))
    full = gpt2_tokenizer.decode(tokens)
    # a stop string that starts inside one token and ends inside a later one
    boundary = len(gpt2_tokenizer.decode(tokens[:4]))
    stop = full[boundary - 2 : boundary + 3]
    expected = full[: full.find(stop)]
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=20,
                            stop_strings=("never appears ~~~", stop))
    pieces = list(stream_text(gpt2_vocab_model, gpt2_tokenizer, prompt, params))
    assert "".join(pieces) == expected


def test_stream_text_holds_back_a_possible_stop_prefix(gpt2_vocab_model, gpt2_tokenizer) -> None:
    """A stop string whose start appears but whose end never does is released at the end."""
    prompt = gpt2_tokenizer.encode("Once upon a time")
    full = gpt2_tokenizer.decode(list(generate_tokens(gpt2_vocab_model, prompt, GREEDY)))
    stop = full[-3:] + "\x00never"
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=20,
                            stop_strings=(stop,))
    pieces = list(stream_text(gpt2_vocab_model, gpt2_tokenizer, prompt, params))
    assert "".join(pieces) == full
    assert pieces[-1].endswith(full[-3:])
