"""Model speed: training tokens/s (float32 and bf16 autocast), and generation tokens/s with and without the KV cache.

Runs the shipped model and a randomly initialised GPT-2-small-sized model side by side
in one process and prints a table. Usage:

    python bench/model_bench.py [--model model/shipped] [--new-tokens 200] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.checkpoint import load_model  # noqa: E402
from model.config import GPTConfig  # noqa: E402
from model.evaluate import autocast  # noqa: E402
from model.generate import SamplingParams, generate_tokens  # noqa: E402
from model.gpt import GPT  # noqa: E402

GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def training_tokens_per_second(model: GPT, batch: int, steps: int, precision: str) -> float:
    """Forward (in precision: fp32 or bf16 autocast) + backward + AdamW step on random windows."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T = model.config.block_size
    x = torch.randint(model.config.vocab_size, (batch, T + 1))
    for step in range(steps + 1):
        if step == 1:  # the first step warms up allocations and is not timed
            start = time.perf_counter()
        with autocast(torch.device("cpu"), precision):
            _, loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return batch * T * steps / (time.perf_counter() - start)


def generation(model: GPT, new_tokens: int, use_cache: bool) -> tuple[float, list[int]]:
    """Greedy tokens/s from a 32-token prompt, and the tokens (to check both paths agree)."""
    prompt = list(range(1, 33))
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, repetition_penalty=1.0)
    list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_new_tokens=4), use_cache=use_cache))  # warm-up
    start = time.perf_counter()
    tokens = list(generate_tokens(model, prompt, params, use_cache=use_cache))
    return len(tokens) / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "model" / "shipped")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shipped = load_model(args.model).model
    models = {f"shipped ({shipped.num_params() / 1e6:.1f}M)": (shipped, 16)}
    small = GPT(GPT2_SMALL).eval()
    models[f"GPT-2 small size ({small.num_params() / 1e6:.0f}M, random)"] = (small, 2)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, greedy")
    header = f"{'model':<34} {'train tok/s':>12} {'bf16 train':>11} {'gen tok/s cache':>16} {'gen tok/s no cache':>19} {'speed-up':>9} {'same':>5}"
    print(header)
    print("-" * len(header))
    for name, (model, batch) in models.items():
        train = training_tokens_per_second(model, batch, args.train_steps, "fp32")
        bf16 = training_tokens_per_second(model, batch, args.train_steps, "bf16")
        with torch.inference_mode():
            cached, a = generation(model, args.new_tokens, use_cache=True)
            uncached, b = generation(model, args.new_tokens, use_cache=False)
        print(f"{name:<34} {train:>12,.0f} {bf16:>11,.0f} {cached:>16,.1f} {uncached:>19,.1f} {cached / uncached:>8.1f}x {str(a == b):>5}")


if __name__ == "__main__":
    main()
