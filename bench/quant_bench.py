"""Quantized-weights benchmark: our engine, llama.cpp and transformers on the same SmolLM2 GGUF file, as tables.

SmolLM2-135M-Instruct's Q4_1 file (run_bot.py pull fetches it) and a Q8_0 file made from it
once, beside it (every 2-D weight dequantized and quantized again to Q8_0; 1-D tensors stay
F32; the metadata and tokenizer copied). Engines, each in a process of its own per round, the
rounds interleaved (A B C, A B C, ...):

  ours          our InferenceEngine on the Q4_1 file, in each of --ours-precisions (a precision
                the engine refuses is noted and left out)
  llama.cpp     llama-cpp-python (the `bench` extra, built from source) on the Q4_1 and Q8_0 files
  transformers  LlamaForCausalLM from the Q4_1 file as float32, single stream only, --hf-rounds rounds

Every engine gets the same token ids (the model's chat template, rendered by us), greedy decoding
that ignores end-of-turn, and the same threads. Per process: one stream of --tokens new tokens
after a short prompt (tokens/s over the whole request, prefill included; time to first token),
then 16 requests of --concurrent-tokens tokens each, all arriving at once (aggregate tokens/s;
time to first token p95 over the 16), and the process's peak RSS. Our engine batches the 16
continuously. llama-cpp-python's Llama object serves one sequence at a time, so llama.cpp runs
them twice: through llama.cpp's own batch API (llama_decode with 16 sequences in one context,
a prefill batch then one 16-token batch per step; the main table) and one after another through
Llama.generate (a table of its own). For ours, the fraction of the memory-bandwidth limit: weight
bytes per token x tokens/s over the bytes/s of a tensor copy run in the same process just before.

Usage:

    python bench/quant_bench.py [--threads 2] [--rounds 5] [--ours-precisions float32,q8,q4] [--quick]

About 2 minutes a round on 2 cores (--quick: 2 minutes in all). Needs the `bench` extra, built from
source (see docs/quantized.md). The engines' modules are imported only in the worker processes that
run them (torch's libraries would add to llama.cpp's peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONCURRENT = 16  # requests of the concurrent measurement
QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple terms.", "Write a haiku about autumn.",
    "How do I boil an egg?", "Give me three tips for better sleep.", "What is a prime number?",
    "Why is the sky blue?", "Suggest a name for a grey cat.", "How does a bicycle stay upright?",
    "What should I pack for a weekend hike?", "Translate 'good morning' into Spanish.", "What is gravity?",
    "Tell me a fun fact about octopuses.", "How do vaccines work?",
    "What is the difference between weather and climate?",
    "Recommend a book for a long train ride.",
]
SINGLE_QUESTION = "Tell me about the history of the bicycle."


@dataclass
class Row:
    """One engine on one set of weights, and what each of its rounds measured."""

    engine: str  # ours, llama.cpp or transformers
    weights: str  # our precision, or the GGUF file's type
    file: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None

    @property
    def label(self) -> str:
        return f"{self.engine} {self.weights}" + (" (Q4_1 file)" if self.engine != "llama.cpp" else "")


# ---- the Q8_0 file ---------------------------------------------------------------------------


def make_q8_0(source: Path, target: Path) -> Path:
    """target, written once from source: its metadata and tokenizer, every 2-D weight as Q8_0, 1-D tensors as they are.

    Q4_1 weights are dequantized and quantized again (gguf.quants, which follows ggml-quants.c);
    a weight that is Q8_0 already (SmolLM2's token embedding) is copied, as requantizing it would
    give it back. Written beside the target and renamed into place, so a reader never sees half a file.
    """
    import gguf
    import numpy as np

    if target.is_file():
        return target
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    reader = gguf.GGUFReader(source)
    partial = target.with_name(f".{target.name}.partial")
    writer = gguf.GGUFWriter(partial, str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()))
    for f in reader.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):  # the writer adds these
            continue
        value = int(gguf.LlamaFileType.MOSTLY_Q8_0) if f.name == gguf.Keys.General.FILE_TYPE else f.contents()
        kind = f.types[0]
        writer.add_key_value(f.name, value, kind, sub_type=f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if len(t.shape) == 1:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
        elif t.tensor_type == q8_0:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=q8_0)
        else:  # (out, in) float32, then (out, in / 32 * 34) bytes
            weights = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(weights, q8_0), raw_dtype=q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)
    return target


# ---- the workers: one engine, one process --------------------------------------------------


def worker() -> None:
    """Run the job on stdin (JSON) and print its result as JSON on the last line of stdout."""
    job = json.loads(sys.stdin.read())
    run = {"ours": run_ours, "llama.cpp": run_llama_cpp, "transformers": run_transformers}[job["engine"]]
    result = run(job)
    result["rss_mib"] = max(result.get("rss_mib", 0.0), peak_rss_mib())
    print(json.dumps(result))


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import torch

    from bench.engine_bench import bytes_per_token, concurrent, copy_bandwidth, greedy, in_thread, timed
    from model.checkpoint import load_model
    from model.engine import InferenceEngine, leave_threads_to_the_engine
    from model.inference_weights import packing

    leave_threads_to_the_engine()  # the engine's worker has the threads: see its docstring
    loaded = load_model(Path(job["file"]), "cpu", max_context=job["context"], on_block=packing(job["weights"]))
    try:
        engine = InferenceEngine(loaded, torch_threads=job["threads"], max_batch=CONCURRENT, precision=job["weights"])
    except ValueError as exc:  # a precision this engine does not have
        return {"refused": str(exc)}
    del loaded  # what the engine does not share with the loaded model is its own copy
    prompt, n, m = job["prompt"], job["tokens"], job["concurrent_tokens"]
    asyncio.run(timed(engine, prompt, greedy(8)))  # warm-up
    # the copy benchmark's two 512 MiB tensors are no part of serving: note the peak before
    # them, then start the high-water mark again (clear_refs 5: Linux's reset of VmHWM)
    rss, others = peak_rss_mib(), OtherLoad()
    bandwidth = in_thread(job["threads"], copy_bandwidth, torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")
    single = asyncio.run(timed(engine, prompt, greedy(n)))
    runs, total = asyncio.run(concurrent(engine, job["prompts"], [0.0] * len(job["prompts"]), m))
    weight_bytes = bytes_per_token(engine.loaded.model)
    engine.close()
    return {"single": {"tokens": single.tokens, "seconds": single.total, "ttft": single.first},
            "concurrent": {"tokens": [r.tokens for r in runs], "seconds": total, "ttft": [r.first for r in runs]},
            "bandwidth": bandwidth, "bytes_per_token": weight_bytes, "rss_mib": rss, "others": others.share()}


def run_transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from bench.engine_bench import FirstToken, hf_generate

    torch.set_num_threads(job["threads"])
    path = Path(job["file"])
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly n tokens, as the others
    hf.generation_config.pad_token_id = 0
    prompt, n = job["prompt"], job["tokens"]
    hf_generate(hf, [prompt], 8)  # warm-up
    streamer, others, start = FirstToken(), OtherLoad(), time.perf_counter()
    tokens = hf_generate(hf, [prompt], n, streamer)[0].tolist()
    seconds = time.perf_counter() - start
    return {"single": {"tokens": tokens, "seconds": seconds, "ttft": streamer.at - start}, "others": others.share()}


def run_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    from llama_cpp import Llama

    threads = job["threads"]
    llm = Llama(job["file"], n_ctx=job["context"], n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt, n, m, prompts = job["prompt"], job["tokens"], job["concurrent_tokens"], job["prompts"]
    _llama_generate(llm, prompt, 8)  # warm-up
    others = OtherLoad()
    single = _llama_generate(llm, prompt, n)
    batched = _llama_batched(llm, prompts, m)
    start, serial = time.perf_counter(), []
    for p in prompts:  # one after another, all arrived at the start: each waits for those before it
        run = _llama_generate(llm, p, m)
        serial.append({**run, "ttft": time.perf_counter() - start - run["seconds"] + run["ttft"]})
    return {"single": single, "concurrent": batched,
            "sequential": {"tokens": [r["tokens"] for r in serial], "seconds": time.perf_counter() - start,
                           "ttft": [r["ttft"] for r in serial]},
            "others": others.share()}


def _llama_generate(llm: Any, prompt: list[int], n: int) -> dict[str, Any]:
    """n greedy tokens through Llama.generate, from an empty KV cache (no reuse of the last prompt)."""
    llm.reset()
    tokens: list[int] = []
    start = first = time.perf_counter()
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=False):
        if not tokens:
            first = time.perf_counter()
        tokens.append(token)
        if len(tokens) == n:
            break
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": first - start}


def _llama_batched(llm: Any, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """n greedy tokens for every prompt through llama.cpp's batch API: one context of len(prompts)
    sequences, each with room for the longest prompt and n tokens; the prompts prefilled together
    (n_batch tokens a call), then one token per sequence a step."""
    import llama_cpp

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # Llama's own settings
    params.n_seq_max, params.n_ctx = len(prompts), len(prompts) * (max(map(len, prompts)) + n)
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    try:
        warm_up = [(0, i, t, i == 3) for i, t in enumerate(prompts[0][:4])]
        _llama_decode(ctx, batch, warm_up, params.n_batch, vocab)
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        # (sequence, position, token, wants logits): the last token of each prompt gives logits
        work = [(s, i, t, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        out: list[list[int]] = [[] for _ in prompts]
        for step in range(n):
            for s, token in _llama_decode(ctx, batch, work, params.n_batch, vocab).items():
                out[s].append(token)
            if step == 0:
                first = time.perf_counter() - start
            work = [(s, len(p) + step, out[s][-1], True) for s, p in enumerate(prompts)]
        seconds = time.perf_counter() - start
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {"tokens": out, "seconds": seconds, "ttft": [first] * len(prompts)}


def _llama_decode(
    ctx: Any, batch: Any, work: list[tuple[int, int, int, bool]], size: int, vocab: int
) -> dict[int, int]:
    """llama_decode the (sequence, position, token, wants logits) entries, size at a time; the greedy
    next token of each sequence that wanted logits (read after each call: the next one overwrites them)."""
    import llama_cpp
    import numpy as np

    chosen: dict[int, int] = {}
    for at in range(0, len(work), size):
        chunk = work[at : at + size]
        for row, (seq, pos, token, logits) in enumerate(chunk):
            batch.token[row], batch.pos[row], batch.n_seq_id[row] = token, pos, 1
            batch.seq_id[row][0], batch.logits[row] = seq, logits
        batch.n_tokens = len(chunk)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError(f"llama_decode failed on {len(chunk)} tokens")
        for row, (seq, _, _, logits) in enumerate(chunk):
            if logits:
                scores = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(vocab,))
                chosen[seq] = int(scores.argmax())
    return chosen


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM, as engine_bench's, which this module cannot
    import in llama.cpp's worker without loading torch."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


class OtherLoad:
    """The share of the machine's CPU time that other processes took between creation and share():
    the noise beside a measurement (this VM's CPUs are shared with processes it cannot see)."""

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        """(wall seconds, seconds of busy CPU on the whole machine, CPU seconds of this process)."""
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        mine = os.times()
        return time.perf_counter(), busy, mine.user + mine.system

    def share(self) -> float:
        (wall0, busy0, mine0), (wall1, busy1, mine1) = self._start, self._now()
        return max(0.0, (busy1 - busy0 - (mine1 - mine0)) / ((wall1 - wall0) * (os.cpu_count() or 1)))


# ---- the rounds ------------------------------------------------------------------------------


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One engine's job in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(job), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)  # its stderr goes in the error
    if done.returncode != 0:
        raise RuntimeError(f"{job['engine']} {job['weights']} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def prompts(file: Path, context: int) -> tuple[list[int], list[list[int]]]:
    """The single stream's prompt and the concurrent ones: the model's chat template around a question."""
    from model.chat_template import ChatTemplate
    from model.checkpoint import load_tokenizer

    tokenizer, _ = load_tokenizer(file, context)
    template = ChatTemplate.for_tokenizer(tokenizer)

    def encode(question: str) -> list[int]:
        return template.encode(tokenizer, [{"role": "user", "content": question}])

    return encode(SINGLE_QUESTION), [encode(q) for q in QUESTIONS[:CONCURRENT]]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(args: argparse.Namespace) -> tuple[list[Row], dict[str, list[int]], int]:
    """Every row's rounds, interleaved; our float32 tokens on each file (the agreement reference);
    the single stream prompt's length."""
    q4, q8 = args.gguf, make_q8_0(args.gguf, args.q8_0)
    single, many = prompts(q4, args.context)
    base = {"threads": args.threads, "context": args.context, "prompt": single, "prompts": many,
            "tokens": args.tokens, "concurrent_tokens": args.concurrent_tokens}
    reference = {}
    for name, file in (("Q4_1", q4), ("Q8_0", q8)):  # also checks that our loader reads the Q8_0 file
        print(f"reference: ours float32 on {file.name} ...", file=sys.stderr)
        result = run_worker({**base, "engine": "ours", "weights": "float32", "file": str(file)}, args.timeout)
        reference[name] = result["single"]["tokens"]
    rows = [Row("ours", p, q4) for p in args.ours_precisions]
    rows += [Row("llama.cpp", "Q4_1", q4), Row("llama.cpp", "Q8_0", q8), Row("transformers", "float32", q4)]
    for r in range(args.rounds):
        for row in rows:
            if row.refused or (row.engine == "transformers" and r >= args.hf_rounds):
                continue
            result = run_worker({**base, "engine": row.engine, "weights": row.weights, "file": str(row.file)},
                                args.timeout)
            if "refused" in result:
                row.refused = result["refused"]
                print(f"note: our engine refuses precision {row.weights!r}: {row.refused}", file=sys.stderr)
                continue
            row.rounds.append(result)
            print(f"round {r + 1}/{args.rounds}: {row.label}: {args.tokens / result['single']['seconds']:.1f} tok/s, "
                  f"{result['wall']:.0f} s", file=sys.stderr)
    return rows, reference, len(single)


# ---- output ----------------------------------------------------------------------------------


def _median_range(values: list[float], fmt: str = "{:.1f}") -> tuple[str, str]:
    if not values:
        return "n/a", ""
    return fmt.format(statistics.median(values)), f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def _speeds(rounds: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Per round: aggregate tokens/s of rounds[key] and its time to first token p95 (ms)."""
    from bench.engine_bench import _p50_p95

    speeds, p95s = [], []
    for r in rounds:
        if key in r:
            done = r[key]
            speeds.append(sum(len(t) for t in done["tokens"]) / done["seconds"])
            p95s.append(1000 * _p50_p95(done["ttft"])[1])
    return speeds, p95s


def report(
    rows: list[Row], reference: dict[str, list[int]], prompt: int, args: argparse.Namespace, seconds: float,
    load: float,
) -> None:
    import llama_cpp
    import torch
    import transformers

    from bench.engine_bench import table

    n, m = args.tokens, args.concurrent_tokens
    print(f"SmolLM2-135M-Instruct; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"llama-cpp-python {llama_cpp.__version__}; {args.threads} threads; {args.rounds} rounds "
          f"(transformers {args.hf_rounds})")
    print(f"{seconds / 60:.1f} minutes; load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} "
          f"at the end, on {os.cpu_count()} CPUs")
    print(f"command: python bench/quant_bench.py {' '.join(sys.argv[1:])}")
    for row in rows:
        if row.refused:
            print(f"left out: ours {row.weights}: the engine refuses it ({row.refused})")
    measured = [row for row in rows if row.rounds]
    main = []
    for row in measured:
        single = [n / r["single"]["seconds"] for r in row.rounds]
        ttft = [1000 * r["single"]["ttft"] for r in row.rounds]
        speeds, p95s = _speeds(row.rounds, "concurrent")
        fractions = [n / r["single"]["seconds"] * r["bytes_per_token"] / r["bandwidth"]
                     for r in row.rounds if "bandwidth" in r]
        main.append((row.label, len(row.rounds), *_median_range(single), _median_range(ttft, "{:.0f}")[0],
                     *_median_range(speeds), _median_range(p95s, "{:.0f}")[0],
                     _median_range([r["rss_mib"] for r in row.rounds], "{:.0f}")[0],
                     *_median_range(fractions, "{:.0%}"),
                     _median_range([r["others"] for r in row.rounds], "{:.0%}")[0]))
    table(f"1. Single stream ({n} greedy tokens after a {prompt}-token prompt) and {CONCURRENT} "
          f"concurrent requests ({m} tokens each, arriving together); medians of the rounds, min-max ranges; "
          "llama.cpp's concurrent figures through its batch API; TTFT: time to first token; of BW limit: see table 2; "
          "others' CPU: the machine's CPU time other processes took during the measurements",
          ["engine / weights", "rounds", "1 stream tok/s", "range", "TTFT ms", f"{CONCURRENT} conc. tok/s", "range",
           "TTFT p95 ms", "peak RSS MiB", "of BW limit", "range", "others' CPU"], main)
    bandwidth = [(row.label, statistics.median(r["bandwidth"] for r in row.rounds) / 1e9,
                  row.rounds[0]["bytes_per_token"] / 1e6,
                  statistics.median(r["bandwidth"] / r["bytes_per_token"] for r in row.rounds))
                 for row in measured if "bandwidth" in row.rounds[0]]
    table("2. Our memory-bandwidth limit: copy bandwidth (read + write, best of 5, measured in the worker just "
          "before its single stream), weight bytes one decoding step reads, and the tokens/s they allow",
          ["engine / weights", "copy GB/s", "MB/token", "limit tok/s"], bandwidth)
    serial = []
    for row in measured:
        speeds, p95s = _speeds(row.rounds, "sequential")
        if speeds:
            same = [sum(a == b for a, b in zip(r["sequential"]["tokens"], r["concurrent"]["tokens"]))
                    for r in row.rounds]
            serial.append((row.label, *_median_range(speeds), _median_range(p95s, "{:.0f}")[0],
                           f"{min(same)}/{CONCURRENT}"))
    table(f"3. llama.cpp's {CONCURRENT} requests one after another (Llama.generate), for comparison with its batch "
          "API in table 1; same tokens: requests whose tokens equal the batched run's, worst round",
          ["engine / weights", "tok/s", "range", "TTFT p95 ms", "same tokens"], serial)
    agreement = [(row.label, *(common_prefix(row.rounds[0]["single"]["tokens"], reference[f]) for f in reference),
                  all(r["single"]["tokens"] == row.rounds[0]["single"]["tokens"] for r in row.rounds))
                 for row in measured]
    table(f"4. Token agreement of the single stream: length of the common prefix (of {n}) with our float32 "
          "engine's greedy tokens on each file; stable: the same tokens in every round",
          ["engine / weights", "vs ours, Q4_1 file", "vs ours, Q8_0 file", "stable"], agreement)


def main() -> None:
    from model.pull import CATALOG, default_models_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=default_models_dir() / CATALOG[0].file_name,
                        help="SmolLM2-135M-Instruct's Q4_1 file (default: where run_bot.py pull puts it)")
    parser.add_argument("--q8-0", type=Path, help="the Q8_0 file made from it (default: beside it, *.Q8_0.gguf)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hf-rounds", type=int, default=3, help="rounds that include transformers (it is slow)")
    parser.add_argument("--ours-precisions", type=lambda s: [p.strip() for p in s.split(",") if p.strip()],
                        default=["float32", "q8", "q4"],
                        help="our engine's precisions, comma-separated (default float32,q8,q4)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens of the single stream")
    parser.add_argument("--concurrent-tokens", type=int, default=64, help="new tokens per concurrent request")
    parser.add_argument("--context", type=int, default=2048, help="our engine's window and llama.cpp's n_ctx "
                        "(the bot's default max_context)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one engine's process may take")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    if not args.gguf.is_file():
        raise SystemExit(f"no {args.gguf}: fetch it with `python run_bot.py pull`, or give --gguf PATH")
    args.q8_0 = args.q8_0 or args.gguf.with_name(args.gguf.name.replace("Q4_1", "Q8_0"))
    if args.q8_0 == args.gguf:
        raise SystemExit("give --q8-0 PATH: the Q4_1 file's name does not say Q4_1")
    if args.quick:
        args.rounds, args.hf_rounds, args.tokens, args.concurrent_tokens = 1, 1, 16, 8
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows, reference, prompt = measure(args)
    report(rows, reference, prompt, args, time.perf_counter() - started, load)


if __name__ == "__main__":
    main()
