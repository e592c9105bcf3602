"""GPT-2-small engines benchmark: our engine, CTranslate2, ONNX Runtime and transformers on the same weights, as tables.

The weights: a seeded random GPT-2-small-sized GPT (124M; torch.manual_seed(0), as engine_bench's
gpt2 model) with the GPT-2 tokenizer, exported once by export_gpt2 as an HF GPT2LMHeadModel folder,
then converted once for the engines that want their own format; all of it kept in --cache
(delete the folder to make it anew):

  hf/                 the GPT2LMHeadModel folder: ours (load_model reads it) and transformers load it
  ct2-float32/        CTranslate2's TransformersConverter of it, float32
  ct2-int8/           the same with quantization="int8" (int8 weights, float32 activations)
  onnx/model.onnx     torch.onnx.export (the dynamo exporter, torch.export underneath) of a wrapper
                      around GPT2LMHeadModel that takes the past keys and values as inputs and returns
                      the last position's logits and the present keys and values, so decoding is
                      incremental; batch, new and past lengths dynamic

Engines, each in a process of its own per round, the rounds interleaved (A B C, A B C, ...):

  ours          our InferenceEngine in each of --ours-precisions (float32, q8, q4)
  ctranslate2   Generator, compute_type int8 and float32; intra_threads = --threads. It picks its
                GEMM library by CPU vendor: Intel MKL on Intel CPUs, oneDNN on others (this VM's AMD
                EPYC). float32 runs once more with CT2_USE_MKL=1, as the two part under load: with
                another busy process on the 2 cores, oneDNN's float32 decoded 5 tokens/s and MKL's
                20 (oneDNN's 36 on a quiet machine), while MKL's int8 fell to a tenth of oneDNN's
  onnxruntime   InferenceSession (CPU, intra_op_num_threads = --threads) driven by a greedy loop here
  transformers  GPT2LMHeadModel.generate, torch threads = --threads

Every engine gets the same token ids (seeded random ids below <|endoftext|>, 32 per prompt), the
same threads and greedy decoding of exactly the tokens asked for (no end token). Per process: one
stream of --tokens new tokens (tokens/s over the whole request, prefill included; time to first
token), then 16 requests of --concurrent-tokens tokens, all arriving at once (aggregate tokens/s;
time to first token p95 over the 16), and the process's peak RSS. How the 16 are served: ours
batches them continuously; CTranslate2 as one generate_batch; ONNX Runtime as one batch of 16 rows
through the incremental loop (the prompts are all of one length, so it needs no attention mask);
transformers as one static generate batch. For ours, the fraction of the memory-bandwidth limit:
weight bytes per token x tokens/s over the bytes/s of a tensor copy run in the same process just
before. Token agreement: the common prefix of each engine's tokens with our float32 engine's.

Usage:

    python bench/gpt2_engines_bench.py [--threads 2] [--rounds 5] [--engines ours,ctranslate2,onnxruntime,transformers]
                                       [--ours-precisions float32,q8,q4] [--quick]

About 3 to 4 minutes a round on 2 quiet cores (an estimate: 15 to 20 minutes for the default 5
rounds), plus about a minute the first time, to make the weights (1.6 GB); --quick takes about 2
minutes, 3 the first time. Needs the `bench` extra for CTranslate2 and ONNX Runtime (an engine
whose package is missing is left out and said so). The engines' modules are imported only in the
worker processes that run them (torch would add to the peak RSS of CTranslate2 and ONNX Runtime).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.quant_bench import (
    OtherLoad,
    _median_range,
    _speeds,
    common_prefix,
    peak_rss_mib,
    run_ours,
)

CONCURRENT = 16  # requests of the concurrent measurement
PROMPT_TOKENS = 32  # every prompt's length: one length lets ONNX Runtime's loop batch without a mask
ORDINARY_IDS = 50256  # GPT-2's ids below <|endoftext|>, the only special one
BLOCK_SIZE = 1024
ENGINES = ("ours", "ctranslate2", "onnxruntime", "transformers")
# (weights, file under the cache folder, environment) of each engine's rows; ours' come from --ours-precisions
THEIR_ROWS = {
    "ctranslate2": [("int8", "ct2-int8", {}), ("float32", "ct2-float32", {}),
                    ("float32", "ct2-float32", {"CT2_USE_MKL": "1"})],  # see the module docstring
    "onnxruntime": [("float32", "onnx/model.onnx", {})],
    "transformers": [("float32", "hf", {})],
}
# modules an engine needs to run, and those it needs besides to make its files once
RUNS_WITH = {"ours": ["torch"], "ctranslate2": ["ctranslate2"], "onnxruntime": ["onnxruntime"],
             "transformers": ["torch", "transformers"]}
MADE_WITH = {"ctranslate2": ["transformers"], "onnxruntime": ["transformers", "onnx", "onnxscript"]}
SERVED_AS = {"ours": "continuous batching", "ctranslate2": "generate_batch", "onnxruntime": "batched loop, 16 rows",
             "transformers": "static batch (generate)"}


@dataclass
class Row:
    """One engine at one precision, and what each of its rounds measured."""

    engine: str  # one of ENGINES
    weights: str  # our precision, or the engine's compute type
    file: Path
    env: dict[str, str] = field(default_factory=dict)  # set in the worker's environment
    rounds: list[dict[str, Any]] = field(default_factory=list)
    refused: str | None = None

    @property
    def label(self) -> str:
        return " ".join([self.engine, self.weights, *(f"({k}={v})" for k, v in self.env.items())])


# ---- the weights, made once ------------------------------------------------------------------


def make_weights(folder: Path, tokenizer_dir: Path, engines: list[str]) -> None:
    """The cache folder's files that engines need and that are not there yet (see the module docstring)."""
    hf = _made(folder / "hf", partial(_export_random_gpt2, tokenizer_dir=tokenizer_dir))
    if "ctranslate2" in engines:
        for quantization in ("float32", "int8"):
            _made(folder / f"ct2-{quantization}", partial(_convert_ct2, hf, quantization=quantization))
    if "onnxruntime" in engines:
        _made(folder / "onnx", partial(_export_onnx, hf))


def _made(target: Path, make: Callable[[Path], None]) -> Path:
    """target, made by make(folder) in a folder beside it and renamed into place, so a reader never
    sees half of it (a half left by a killed run is made again)."""
    if target.exists():
        return target
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"making {target} ...", file=sys.stderr)
    make(partial)
    os.replace(partial, target)
    return target


def _export_random_gpt2(folder: Path, tokenizer_dir: Path) -> None:
    import torch

    from bench.engine_bench import GPT2_SMALL
    from model.checkpoint import export_gpt2
    from model.gpt import GPT
    from model.tokenizer import ChatTokenizer

    tokenizer = ChatTokenizer.from_gpt2_files(tokenizer_dir / "encoder.json", tokenizer_dir / "vocab.bpe")
    torch.manual_seed(0)
    export_gpt2(GPT(GPT2_SMALL).eval(), tokenizer, folder)


def _convert_ct2(hf: Path, folder: Path, quantization: str) -> None:
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf)).convert(str(folder), quantization=quantization, force=True)


def _export_onnx(hf: Path, folder: Path) -> None:
    """GPT2LMHeadModel with its KV cache as explicit inputs and outputs, for ONNX Runtime.

    The inputs: input_ids (batch, new) and past_key_<layer>, past_value_<layer> (batch, heads, past,
    head size); the outputs: logits (batch, vocab) of the last position and present_key_<layer>,
    present_value_<layer> (batch, heads, past + new, head size). A past of length 0 starts a sequence.
    The example lengths are all different and above 1, as torch.export specializes sizes 0 and 1.
    """
    import torch
    from torch import nn
    from transformers import DynamicCache, GPT2LMHeadModel

    class WithPast(nn.Module):  # here, not at the top: only this worker may import torch
        def __init__(self, model: GPT2LMHeadModel) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.model.config)
            out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], *(t for layer in out.cache.layers for t in (layer.keys, layer.values))

    model = GPT2LMHeadModel.from_pretrained(hf, dtype=torch.float32).eval()
    config = model.config
    layers = range(config.n_layer)
    past_names = [f"past_{kind}_{i}" for i in layers for kind in ("key", "value")]
    batch, past_length = torch.export.Dim("batch"), torch.export.Dim("past")
    past = tuple(torch.randn(2, config.n_head, 3, config.n_embd // config.n_head) for _ in past_names)
    with torch.inference_mode():
        torch.onnx.export(
            WithPast(model), (torch.randint(0, ORDINARY_IDS, (2, 5)), past), folder / "model.onnx", dynamo=True,
            input_names=["input_ids", *past_names],
            output_names=["logits", *(name.replace("past", "present") for name in past_names)],
            dynamic_shapes=({0: batch, 1: torch.export.Dim("new")}, tuple({0: batch, 2: past_length} for _ in past)),
        )


# ---- the workers: one engine, one process --------------------------------------------------


def worker() -> None:
    """Run the job on stdin (JSON) and print its result as JSON on the last line of stdout."""
    job = json.loads(sys.stdin.read())
    if job["engine"] == "prepare":
        make_weights(Path(job["folder"]), Path(job["tokenizer"]), job["engines"])
        print(json.dumps({}))
        return
    run = {"ours": run_ours, "ctranslate2": run_ctranslate2, "onnxruntime": run_onnxruntime,
           "transformers": run_transformers}[job["engine"]]
    result = run(job)
    result["rss_mib"] = max(result.get("rss_mib", 0.0), peak_rss_mib())
    print(json.dumps(result))


def run_ctranslate2(job: dict[str, Any]) -> dict[str, Any]:
    import ctranslate2

    folder = Path(job["file"])
    vocabulary = json.loads((folder / "vocabulary.json").read_text())  # CTranslate2 takes tokens as strings

    def words(ids: list[int]) -> list[str]:
        return [vocabulary[i] for i in ids]

    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=job["weights"],
                                      inter_threads=1, intra_threads=job["threads"])
    prompt, n, m = words(job["prompt"]), job["tokens"], job["concurrent_tokens"]
    _ct2_stream(generator, prompt, 8)  # warm-up
    others = OtherLoad()
    single = _ct2_stream(generator, prompt, n)
    batched = _ct2_batch(generator, [words(p) for p in job["prompts"]], m)
    del generator  # now, not at exit: left to the interpreter's exit, it aborts the process now and then
    return {"single": single, "concurrent": batched, "others": others.share()}


def _ct2_stream(generator: Any, prompt: list[str], n: int) -> dict[str, Any]:
    """n greedy tokens through generate_tokens (min_length = n: the end token cannot stop it early)."""
    tokens: list[int] = []
    start = first = time.perf_counter()
    for step in generator.generate_tokens(prompt, max_length=n, min_length=n, sampling_topk=1):
        if not tokens:
            first = time.perf_counter()
        tokens.append(step.token_id)
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": first - start}


def _ct2_batch(generator: Any, prompts: list[list[str]], n: int) -> dict[str, Any]:
    """n greedy tokens for every prompt in one generate_batch; its callback notes each row's first token."""
    firsts = [float("nan")] * len(prompts)
    start = time.perf_counter()

    def seen(step: Any) -> bool:
        if step.step == 0:
            firsts[step.batch_id] = time.perf_counter() - start
        return False  # go on

    results = generator.generate_batch(prompts, max_length=n, min_length=n, sampling_topk=1,
                                       include_prompt_in_result=False, callback=seen)
    return {"tokens": [r.sequences_ids[0] for r in results], "seconds": time.perf_counter() - start, "ttft": firsts}


def run_onnxruntime(job: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = job["threads"], 1
    session = onnxruntime.InferenceSession(job["file"], options, providers=["CPUExecutionProvider"])
    prompt, n, m = job["prompt"], job["tokens"], job["concurrent_tokens"]
    _ort_generate(session, [prompt], 8)  # warm-up
    others = OtherLoad()
    single = _one_row(_ort_generate(session, [prompt], n))
    batched = _ort_generate(session, job["prompts"], m)
    return {"single": single, "concurrent": batched, "others": others.share()}


def _ort_generate(session: Any, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """n greedy tokens for every prompt as one batch: the prompts in one call, then one call a step
    that feeds the last call's present keys and values back as the past (kept as OrtValues, not
    copied out to numpy). The prompts must be of one length: the graph has no attention mask."""
    import numpy as np
    from onnxruntime import OrtValue

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("the ONNX Runtime loop batches prompts of one length only")
    empty = {i.name: np.zeros((len(prompts), i.shape[1], 0, i.shape[3]), np.float32) for i in session.get_inputs()[1:]}
    past = {name: OrtValue.ortvalue_from_numpy(value) for name, value in empty.items()}
    ids = np.array(prompts, dtype=np.int64)  # (batch, prompt), then (batch, 1)
    out: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for step in range(n):
        logits, *present = session.run_with_ort_values(None, {"input_ids": OrtValue.ortvalue_from_numpy(ids), **past})
        ids = np.ascontiguousarray(logits.numpy().argmax(-1)[:, None], dtype=np.int64)
        for row, token in zip(out, ids[:, 0].tolist()):
            row.append(token)
        if step == 0:
            first = time.perf_counter() - start
        past = dict(zip(past, present))  # the outputs come in the inputs' order (see _export_onnx)
    return {"tokens": out, "seconds": time.perf_counter() - start, "ttft": [first] * len(prompts)}


def run_transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import GPT2LMHeadModel

    from bench.engine_bench import hf_generate

    torch.set_num_threads(job["threads"])
    hf = GPT2LMHeadModel.from_pretrained(job["file"], dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly n tokens, as the others
    hf.generation_config.pad_token_id = 0
    hf_generate(hf, [job["prompt"]], 8)  # warm-up
    others = OtherLoad()
    single = _one_row(_hf_timed(hf, [job["prompt"]], job["tokens"]))
    batched = _hf_timed(hf, job["prompts"], job["concurrent_tokens"])
    return {"single": single, "concurrent": batched, "others": others.share()}


def _hf_timed(hf: Any, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """n greedy tokens for every prompt in one generate call; every row's first token comes at once."""
    from bench.engine_bench import FirstToken, hf_generate

    streamer, start = FirstToken(), time.perf_counter()
    tokens = hf_generate(hf, prompts, n, streamer).tolist()
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": [streamer.at - start] * len(prompts)}


def _one_row(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of one, as a single stream's result."""
    return {"tokens": batch["tokens"][0], "seconds": batch["seconds"], "ttft": batch["ttft"][0]}


# ---- the rounds ------------------------------------------------------------------------------


def run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One job in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(job), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **job.get("env", {})},
                          check=False)  # its stderr goes in the error
    if done.returncode != 0:
        raise RuntimeError(f"{job['engine']} {job.get('weights', '')} failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def prompts() -> tuple[list[int], list[list[int]]]:
    """The single stream's prompt and the concurrent ones: seeded random ids, PROMPT_TOKENS each."""
    rng = random.Random(0)
    draw = [[rng.randrange(ORDINARY_IDS) for _ in range(PROMPT_TOKENS)] for _ in range(1 + CONCURRENT)]
    return draw[0], draw[1:]


def missing(engine: str, folder: Path) -> list[str]:
    """The modules engine needs that are not installed: to run, and to make its files if they are not made yet."""
    made = all((folder / file).exists() for _, file, _ in THEIR_ROWS.get(engine, []))
    needed = RUNS_WITH[engine] + ([] if made else MADE_WITH.get(engine, []))
    return [name for name in needed if importlib.util.find_spec(name) is None]


def rows_for(engines: list[str], args: argparse.Namespace) -> list[Row]:
    """Our precisions' rows first, then the other engines' in ENGINES order."""
    rows = [Row("ours", p, args.cache / "hf") for p in args.ours_precisions] if "ours" in engines else []
    return rows + [Row(e, weights, args.cache / file, dict(env))
                   for e in engines if e != "ours" for weights, file, env in THEIR_ROWS[e]]


def measure(rows: list[Row], args: argparse.Namespace) -> None:
    """Every row's rounds, interleaved."""
    single, many = prompts()
    base = {"threads": args.threads, "context": BLOCK_SIZE, "prompt": single, "prompts": many,
            "tokens": args.tokens, "concurrent_tokens": args.concurrent_tokens}
    for r in range(args.rounds):
        for row in rows:
            if row.refused:
                continue
            job = {**base, "engine": row.engine, "weights": row.weights, "file": str(row.file), "env": row.env}
            result = run_worker(job, args.timeout)
            if "refused" in result:
                row.refused = result["refused"]
                print(f"note: our engine refuses precision {row.weights!r}: {row.refused}", file=sys.stderr)
                continue
            row.rounds.append(result)
            print(f"round {r + 1}/{args.rounds}: {row.label}: {args.tokens / result['single']['seconds']:.1f} tok/s, "
                  f"{result['wall']:.0f} s", file=sys.stderr)


# ---- output ----------------------------------------------------------------------------------


def report(rows: list[Row], skipped: list[str], args: argparse.Namespace, seconds: float, load: float) -> None:
    from bench.engine_bench import table

    n, m = args.tokens, args.concurrent_tokens
    packages = ["torch", "transformers", "ctranslate2", "onnxruntime"]
    versions = ", ".join(f"{p} {version(p)}" for p in packages if importlib.util.find_spec(p))
    print(f"GPT-2 small size (124M, random weights, seeded); {versions}; {args.threads} threads; {args.rounds} rounds")
    print(f"{seconds / 60:.1f} minutes; load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} "
          f"at the end, on {os.cpu_count()} CPUs")
    print(f"command: python bench/gpt2_engines_bench.py {' '.join(sys.argv[1:])}")
    for line in skipped:
        print(f"skipped: {line}")
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
                     *_median_range(speeds), _median_range(p95s, "{:.0f}")[0], SERVED_AS[row.engine],
                     _median_range([r["rss_mib"] for r in row.rounds], "{:.0f}")[0],
                     *_median_range(fractions, "{:.0%}"),
                     _median_range([r["others"] for r in row.rounds], "{:.0%}")[0]))
    table(f"1. Single stream ({n} greedy tokens after a {PROMPT_TOKENS}-token prompt) and {CONCURRENT} concurrent "
          f"requests ({m} tokens each, {PROMPT_TOKENS}-token prompts, arriving together); medians of the rounds, "
          "min-max ranges; TTFT: time to first token; peak RSS: the engine's own process; of BW limit: see table 2; "
          "others' CPU: the machine's CPU time other processes took during the measurements",
          ["engine / weights", "rounds", "1 stream tok/s", "range", "TTFT ms", f"{CONCURRENT} conc. tok/s", "range",
           "TTFT p95 ms", f"{CONCURRENT} served as", "peak RSS MiB", "of BW limit", "range", "others' CPU"], main)
    bandwidth = [(row.label, statistics.median(r["bandwidth"] for r in row.rounds) / 1e9,
                  row.rounds[0]["bytes_per_token"] / 1e6,
                  statistics.median(r["bandwidth"] / r["bytes_per_token"] for r in row.rounds))
                 for row in measured if "bandwidth" in row.rounds[0]]
    table("2. Our memory-bandwidth limit: copy bandwidth (read + write, best of 5, measured in the worker just "
          "before its single stream), weight bytes one decoding step reads, and the tokens/s they allow",
          ["engine / weights", "copy GB/s", "MB/token", "limit tok/s"], bandwidth)
    reference = next((row.rounds[0] for row in measured if row.label == "ours float32"), None)
    if reference is None:
        if measured:
            print("\nno token agreement table: it compares with ours float32, which was not measured")
        return
    agreement = [(row.label, "yes" if row.weights == "float32" else "no",
                  common_prefix(row.rounds[0]["single"]["tokens"], reference["single"]["tokens"]),
                  min(map(common_prefix, row.rounds[0]["concurrent"]["tokens"], reference["concurrent"]["tokens"])),
                  all(r[key]["tokens"] == row.rounds[0][key]["tokens"] for r in row.rounds
                      for key in ("single", "concurrent")))
                 for row in measured]
    table(f"3. Token agreement with our float32 engine's greedy tokens: length of the common prefix of the single "
          f"stream (of {n}) and the shortest of the {CONCURRENT} requests' (of {m}); should agree: float32 "
          "everywhere, so only near-ties may part them; stable: the same tokens in every round",
          ["engine / weights", "should agree", "1 stream", f"{CONCURRENT} requests, worst", "stable"], agreement)


def _names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or not set(names) <= set(allowed):
        raise argparse.ArgumentTypeError(f"give some of {','.join(allowed)}, separated by commas; got {text!r}")
    return [name for name in allowed if name in names]


def main() -> None:
    from model.cpu_kernels import cache_dir
    from model.inference_weights import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=cache_dir() / "bench" / "gpt2-random",
                        help="where the weights are made once and kept (default ~/.cache/gptbot/bench/gpt2-random)")
    parser.add_argument("--gpt2-tokenizer", type=Path,
                        default=Path(os.environ.get("GPT2_TOKENIZER_DIR", "/work/shared/data/gpt2-tokenizer")))
    parser.add_argument("--threads", type=int, default=2, help="threads of every engine")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", type=lambda s: _names(s, ENGINES), default=list(ENGINES),
                        help=f"some of {','.join(ENGINES)}, comma-separated (default all)")
    parser.add_argument("--ours-precisions", type=lambda s: _names(s, PRECISIONS), default=["float32", "q8", "q4"],
                        help="our engine's precisions, comma-separated (default float32,q8,q4)")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens of the single stream")
    parser.add_argument("--concurrent-tokens", type=int, default=64, help="new tokens per concurrent request")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one engine's process may take")
    parser.add_argument("--quick", action="store_true", help="1 round of few tokens, to check the script runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    if args.quick:
        args.rounds, args.tokens, args.concurrent_tokens = 1, 16, 8
    skipped, engines = [], []
    for engine in args.engines:
        if absent := missing(engine, args.cache):
            skipped.append(f"{engine}: {', '.join(absent)} not installed (pip install -e '.[bench]')")
            print(f"skipped: {skipped[-1]}", file=sys.stderr)
        else:
            engines.append(engine)
    started, load = time.perf_counter(), os.getloadavg()[0]
    run_worker({"engine": "prepare", "folder": str(args.cache), "tokenizer": str(args.gpt2_tokenizer),
                "engines": engines}, args.timeout)
    rows = rows_for(engines, args)
    measure(rows, args)
    report(rows, skipped, args, time.perf_counter() - started, load)


if __name__ == "__main__":
    main()
