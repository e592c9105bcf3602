"""The key/value pool in float32 against float16 (BOT_KV_PRECISION) on SmolLM2-135M-Instruct's Q4_1 file in q4:
the pool's bytes, a lone stream's decoding rate at a long context (rounds interleaved, the two orders
alternating, medians and the median of each round's ratio) and greedy agreement. It drives the engine's
Batcher in this thread, as the engine's worker does; the long prompt (the docs' own text) is prefilled once
into the conversation cache, so each round times decoding at positions prompt..prompt + new.

    python bench/kv_precision_bench.py [--rounds 8] [--prompt 1500] [--new 40] [--threads 1]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.batching import Batcher, Request  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.generate import SamplingParams  # noqa: E402
from model.inference_weights import prepare  # noqa: E402
from model.pull import CATALOG, default_models_dir  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=8)
p.add_argument("--prompt", type=int, default=1500)
p.add_argument("--new", type=int, default=40)
p.add_argument("--dtypes", default="float32,float16")
p.add_argument("--agree", type=int, default=4, help="prompts for the agreement check (0: none)")
p.add_argument("--threads", type=int, default=1)
args = p.parse_args()
print(f"command: python bench/kv_precision_bench.py {' '.join(sys.argv[1:])}")
torch.set_num_threads(args.threads)

loaded = load_model(default_models_dir() / CATALOG[0].file_name, max_context=2048)
model = prepare(loaded.model, "q4")
tok = loaded.tokenizer
text = "\n\n".join(Path(f).read_text() for f in sorted((ROOT / "docs").glob("*.md")))
ids = tok.encode(text)
print(f"corpus {len(ids)} tokens; config block {model.config.block_size}, layers {model.config.n_layer}, "
      f"kv heads {model.config.n_kv_head}, head dim {model.config.head_dim}", flush=True)
dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]


def batcher(dtype):
    kw = {} if dtype == torch.float32 else {"kv_dtype": dtype}
    # the conversation cache keeps the long prompt's keys and values: later rounds prefill one token
    return Batcher(model, max_batch=1, cache_bytes=2**30, prefill_chunk=256, **kw)


def run(b, prompt, new, key=None):
    """Tokens, seconds to the first, decode tok/s by the wall clock and by this thread's CPU time."""
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=new)
    r = Request(prompt_ids=prompt, params=params, cache_key=key)
    b.add(r)
    out, times, cpu = [], [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        while not b.idle:
            for req, item in b.step():
                if isinstance(item, int):
                    out.append(item)
                    times.append(time.perf_counter())
                    cpu.append(time.thread_time())
    n = len(times) - 1
    return out, times[0] - t0, n / (times[-1] - times[0]), n / (cpu[-1] - cpu[0])


batchers = {d: batcher(d) for d in dtypes}
for d, b in batchers.items():
    pool = b.kv
    print(f"{d}: {pool.bytes_per_token()} B/token; pool of 16 rows x {model.config.block_size} positions = "
          f"{16 * model.config.block_size * pool.bytes_per_token() / 2**20:.0f} MiB", flush=True)

prompt = ids[: args.prompt]
for b in batchers.values():
    run(b, prompt[:300], 10)  # warm-up
rates = {d: [] for d in dtypes}
cpu_rates = {d: [] for d in dtypes}
for r in range(args.rounds + 1):  # round 0 prefills the prompt into each conversation cache: not counted
    order = dtypes if r % 2 == 0 else dtypes[::-1]
    for d in order:
        _, first, rate, cpu_rate = run(batchers[d], prompt, args.new, key="long")
        if r:
            rates[d].append(rate)
            cpu_rates[d].append(cpu_rate)
        print(f"round {r} {d}: first token {first:.2f} s, decode {rate:.1f} tok/s wall, {cpu_rate:.1f} tok/s of CPU time",
              flush=True)
if args.rounds and len(dtypes) == 2:
    pairs = [b / a for a, b in zip(rates[dtypes[0]], rates[dtypes[1]])]
    cpu_pairs = [b / a for a, b in zip(cpu_rates[dtypes[0]], cpu_rates[dtypes[1]])]
    print(f"PAIRED {dtypes[1]} / {dtypes[0]} decode rate, same round: median {statistics.median(pairs):.3f} wall, "
          f"{statistics.median(cpu_pairs):.3f} CPU time")
for d in dtypes if args.rounds else []:
    print(f"MEDIAN {d}: decode {statistics.median(rates[d]):.1f} tok/s wall, {statistics.median(cpu_rates[d]):.1f} tok/s "
          f"of CPU time (wall {[round(x, 1) for x in rates[d]]})")

if args.agree and len(dtypes) == 2:
    step = (len(ids) - args.prompt) // args.agree
    same = 0
    for i in range(args.agree):
        pr = ids[i * step : i * step + args.prompt // (1 + i % 2)]  # long and shorter prompts
        a = run(batchers[dtypes[0]], pr, args.new)[0]
        bb = run(batchers[dtypes[1]], pr, args.new)[0]
        first_diff = next((j for j, (x, y) in enumerate(zip(a, bb)) if x != y), None)
        same += a == bb
        print(f"prompt {i} ({len(pr)} tokens): {'identical' if a == bb else f'first differs at token {first_diff}'}"
              f" over {len(a)} tokens")
    print(f"AGREEMENT: {same}/{args.agree} identical greedy continuations of {args.new} tokens")
    with torch.inference_mode():
        b = batchers[torch.float32]
        pool_k = b.kv.k  # the last prompt's row was freed, its contents remain
        print(f"largest |key| {pool_k.abs().max().item():.1f}, |value| {b.kv.v.abs().max().item():.1f} (float16 max 65504)")
