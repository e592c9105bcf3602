"""Scoring a model on dialogues (loss, perplexity, bits per byte) and the `eval` command.

Bits per byte = (sum over scored tokens of -log2 p(token | context)) / (UTF-8 bytes those
tokens decode to). Every token of every conversation is scored: the role and
end-of-turn tokens too (they carry information: who speaks, where a message ends),
but they decode to no bytes, so the denominator is exactly the UTF-8 length of the
turn texts as the tokenizer reproduces them. Each conversation is scored on its own,
starting after eos_id; one longer than the context is scored in windows that overlap
by half a context, each token once. Lower is better and, unlike loss per token, the
number is comparable between models with different tokenizers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.checkpoint import CheckpointError, load_model
from model.data import IGNORE_INDEX, Conversation, encode_conversation, load_corpus
from model.tokenizer import ChatTokenizer

DATA_HELP = "dialogue file or folder: .jsonl, chitchat/Topical-Chat .json[.gz], Persona-Chat .csv; repeatable"
Window = tuple[list[int], list[int]]  # inputs, targets of at most block_size tokens


def resolve_device(name: str) -> torch.device:
    """The torch device for --device: "auto" takes CUDA when present; "cuda" without it is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (try --device cpu)")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default (fast, no loss scaling needed), and on a CPU when asked.

    CPUs with AVX512-BF16 or AMX run bf16 matrix products about twice as fast as float32;
    on others torch emulates them, slower, which is why auto keeps a CPU in float32.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def scoring_windows(inputs: list[int], targets: list[int], block_size: int) -> list[Window]:
    """Cover one conversation with windows of at most block_size; each target is scored once.

    Past the first window, a window moves on by half a block and scores only its new
    targets, so each of them sees at least half a block of context.
    """
    n = len(inputs)
    stride = max(1, block_size // 2)
    windows, start, scored = [], 0, 0  # targets before `scored` are counted already
    while scored < n:
        end = min(start + block_size, n)
        fresh = targets[scored:end]
        windows.append((inputs[start:end], [IGNORE_INDEX] * (scored - start) + fresh))
        scored = end
        start = max(0, min(start + stride, n - block_size))
    return windows


@torch.inference_mode()
def score(
    model: nn.Module,
    tokenizer: ChatTokenizer,
    conversations: Sequence[Conversation],
    block_size: int,
    *,
    batch_size: int = 16,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte of the model on these conversations.

    The model is any module whose forward(inputs, targets) returns (logits, mean loss)
    ignoring target IGNORE_INDEX.
    """
    windows: list[Window] = []
    n_bytes = 0
    for turns in conversations:
        inputs, targets = encode_conversation(tokenizer, turns)
        n_bytes += len(tokenizer.decode(targets).encode("utf-8"))
        windows.extend(scoring_windows(inputs, targets, block_size))
    windows.sort(key=lambda w: len(w[0]), reverse=True)  # similar lengths share a batch: less padding
    was_training = model.training
    model.eval()
    nats, n_tokens = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x, y = _pad(windows[i : i + batch_size])
        n = int((y != IGNORE_INDEX).sum())
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        nats += loss.item() * n  # the model's loss is the mean over the n scored targets
        n_tokens += n
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("nothing to score: no conversations")
    loss = nats / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else math.inf,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "conversations": len(conversations),
    }


def _pad(windows: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs padded with 0 and targets padded with IGNORE_INDEX; padding comes last, so
    a causal model's scored positions never see it."""
    width = max(len(inputs) for inputs, _ in windows)
    x = torch.zeros(len(windows), width, dtype=torch.long)
    y = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (inputs, targets) in enumerate(windows):
        x[row, : len(inputs)] = torch.tensor(inputs)
        y[row, : len(targets)] = torch.tensor(targets)
    return x, y


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a number of this kind above zero."""

    def parse(text: str) -> Any:
        value = parse_number(kind, text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_number(kind: type, text: str) -> Any:
    """An argparse type check: a finite number of this kind."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def format_report(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table, names left-aligned."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="DIR", help="model folder, as `train` writes")
    parser.add_argument("--data", type=Path, required=True, action="append", metavar="PATH", help=DATA_HELP)
    parser.add_argument("--limit", type=positive(int), metavar="N", help="score only the first N conversations")
    parser.add_argument("--batch-size", type=positive(int), default=16, metavar="N", help="windows per pass (16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    parser.add_argument("--threads", type=positive(int), metavar="N", help="torch CPU threads (default: torch's)")


def run_eval(args: argparse.Namespace) -> int:
    """Print loss, perplexity and bits per byte of --model on --data; 2 on a usage error."""
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        device = resolve_device(args.device)
        conversations = [conv for path in args.data for conv in load_corpus(path)][: args.limit]
        if not conversations:
            raise ValueError(f"no conversations in {', '.join(str(p) for p in args.data)}")
        loaded = load_model(args.model, str(device))
    except (ValueError, CheckpointError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    result = score(
        loaded.model, loaded.tokenizer, conversations, loaded.config.block_size,
        batch_size=args.batch_size, device=device,
    )
    print(format_report([
        ("model", f"{loaded.name} ({loaded.model.num_params():,} parameters)"),
        ("data", ", ".join(str(p) for p in args.data)),
        ("conversations", f"{result['conversations']:,}"),
        ("tokens", f"{result['tokens']:,}"),
        ("bytes", f"{result['bytes']:,}"),
        ("loss", f"{result['loss']:.4f} nats/token"),
        ("perplexity", f"{result['perplexity']:.2f}"),
        ("bits/byte", f"{result['bits_per_byte']:.4f}"),
    ]))
    return 0
