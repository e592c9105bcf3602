"""Scoring (loss, perplexity, bits per byte) and the eval command, on tiny real GPTs."""

import argparse
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.data import IGNORE_INDEX, conversation_ids, encode_conversation
from model.evaluate import add_eval_arguments, run_eval, score, scoring_windows
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

CONVERSATIONS = [
    ["hello there", "hi! how are you?", "fine, thanks"],
    ["café au lait ☕", "très bien"],  # multi-byte characters: bytes, not characters, count
    ["a long one " * 12, "ok"],  # longer than the context: scored in windows
]


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer.train([t for c in CONVERSATIONS for t in c] * 5, vocab_size=300)


def tiny_gpt(tokenizer: ChatTokenizer, block_size: int = 16) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return GPT(config)


def test_uniform_model_matches_hand_computation(tokenizer):
    model = tiny_gpt(tokenizer)
    for p in model.parameters():
        torch.nn.init.zeros_(p)  # zero logits: every token has probability 1 / vocab_size
    result = score(model, tokenizer, CONVERSATIONS, block_size=16, batch_size=2)
    n_tokens = sum(len(conversation_ids(tokenizer, c)) for c in CONVERSATIONS)
    n_bytes = sum(len(turn.encode("utf-8")) for c in CONVERSATIONS for turn in c)
    vocab = tokenizer.vocab_size
    assert result["tokens"] == n_tokens
    assert result["bytes"] == n_bytes
    assert result["loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / n_bytes, rel=1e-5)


def test_batched_padded_scoring_equals_one_conversation_at_a_time(tokenizer):
    model = tiny_gpt(tokenizer, block_size=64)
    short = CONVERSATIONS[:2]
    nats = 0.0
    for turns in short:
        inputs, targets = encode_conversation(tokenizer, turns)
        _, loss = model(torch.tensor([inputs]), torch.tensor([targets]))
        nats += loss.item() * len(targets)
    result = score(model, tokenizer, short, block_size=64, batch_size=2)
    assert result["loss"] * result["tokens"] == pytest.approx(nats, rel=1e-5)


@given(n=st.integers(1, 200), block_size=st.integers(2, 40))
def test_windows_score_every_target_once_with_half_a_block_of_context(n, block_size):
    inputs, targets = list(range(n)), list(range(1000, 1000 + n))
    seen = []
    for k, (window_inputs, window_targets) in enumerate(scoring_windows(inputs, targets, block_size)):
        assert 1 <= len(window_inputs) == len(window_targets) <= block_size
        start = window_inputs[0]
        assert window_inputs == inputs[start : start + len(window_inputs)]
        for offset, t in enumerate(window_targets):
            if t != IGNORE_INDEX:
                assert t == targets[start + offset]
                assert k == 0 or offset >= block_size - block_size // 2  # context of offset + 1 tokens
                seen.append(t)
    assert seen == targets


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def test_eval_command_prints_a_table(tokenizer, tmp_path, capsys):
    save_checkpoint(tmp_path / "m", tiny_gpt(tokenizer), tokenizer)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"turns": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    assert run_eval(eval_args("--model", str(tmp_path / "m"), "--data", str(data), "--device", "cpu")) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["conversations"] == "3"
    assert 0 < float(rows["bits/byte"]) < 20
    assert math.isfinite(float(rows["loss"].split()[0]))


def test_eval_errors_are_one_line_messages(tokenizer, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    data.write_text('["hi", "hello"]\n')
    assert run_eval(eval_args("--model", str(tmp_path / "nowhere"), "--data", str(data))) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    save_checkpoint(tmp_path / "m", tiny_gpt(tokenizer), tokenizer)
    assert run_eval(eval_args("--model", str(tmp_path / "m"), "--data", str(tmp_path / "chat.txt"))) == 2
    assert "chat.txt: no such file or folder" in capsys.readouterr().err
