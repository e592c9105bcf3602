"""Engine benchmarks: our inference engine against transformers on identical weights, as tables.

Up to three models side by side in one run: the shipped chat model; a randomly initialised
GPT-2-small-sized GPT (124M) with the GPT-2 tokenizer; and SmolLM2-135M-Instruct, the bot's
default model, from its real Q4_1 GGUF file dequantized to float32 (run_bot.py pull fetches it).
transformers runs GPT2LMHeadModel loaded from export_gpt2 of the very same weights for the first
two, and LlamaForCausalLM loaded from the same GGUF file for SmolLM2, with the same torch threads.
Usage:

    python bench/engine_bench.py [--threads 2] [--device cpu] [--models shipped,gpt2,smollm2] [--quick]

The default is shipped,gpt2 (about 10 minutes on 2 cores); smollm2 alone takes about 5 minutes.

Tables: single stream (200 greedy tokens; with and without KV cache); the memory-bandwidth
limit; concurrent conversations (ours vs transformers one after another vs transformers static
batching); time to first token over a multi-turn conversation with and without cache reuse;
precision and threads, each with tokens/s (and bits per byte on validation for the shipped model);
peak resident memory of a serving process. SmolLM2 gets one concurrency level (16) unless
--concurrency says otherwise, and no multi-turn or precision table (they would double its run;
bits per byte need our own validation data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.config import Settings  # noqa: E402
from bot.prompt import PromptTemplate, Turn, build_prompt  # noqa: E402
from model.checkpoint import LoadedModel, export_gpt2, load_model  # noqa: E402
from model.config import GPTConfig  # noqa: E402
from model.cpu_kernels import PackedLinear  # noqa: E402
from model.data import load_corpus, split_by_conversation  # noqa: E402
from model.engine import InferenceEngine, leave_threads_to_the_engine  # noqa: E402
from model.evaluate import score  # noqa: E402
from model.generate import SamplingParams, generate_tokens  # noqa: E402
from model.gpt import GPT  # noqa: E402
from model.inference_weights import PRECISIONS, CpuLinear, prepare  # noqa: E402
from model.pull import CATALOG, default_models_dir  # noqa: E402
from model.tokenizer import ChatTokenizer  # noqa: E402

T = TypeVar("T")
MODELS = ("shipped", "gpt2", "smollm2")
OPTIONAL = frozenset({"multi-turn", "precision", "threads"})  # the tables a model may be left out of
GPT2_SMALL = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
PERSONA = "I am a friendly chat bot. I answer briefly and kindly."
MESSAGES = [
    "hi there, how are you today?", "what do you like to do on weekends?", "i just got back from a run.",
    "do you have any pets?", "my dog is called rex and he loves the beach.", "what is your favourite food?",
    "i could eat pizza every day.", "have you been to italy?", "i want to learn to cook pasta properly.",
    "what music do you listen to?", "i play the guitar a little.", "do you read books?",
    "i am reading a novel about the sea.", "what is the weather like where you are?", "it is raining here.",
    "tell me something funny.", "that made me laugh.", "i have to work early tomorrow.",
    "any tips for sleeping well?", "thanks, good night!",
]


@dataclass
class Subject:
    key: str  # one of MODELS
    name: str
    loaded: LoadedModel
    hf: Any  # transformers' GPT2LMHeadModel or LlamaForCausalLM with the same weights
    prompt_lengths: tuple[int, int]  # shortest and longest prompt of the concurrency runs
    reply_tokens: int  # reply budget of the multi-turn conversation
    repeats: int  # runs of each measurement (the cheap ones); the median is reported
    levels: tuple[int, ...]  # numbers of concurrent conversations, unless --concurrency gives them
    optional: frozenset[str] = OPTIONAL  # the optional tables measured for this model


@dataclass
class Timed:
    tokens: list[int]
    first: float  # seconds from arrival to the first new token
    total: float  # seconds from arrival to the last


def greedy(n: int, stop: Sequence[int] = ()) -> SamplingParams:
    return SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n, stop_ids=tuple(stop))


def random_prompt(tokenizer: ChatTokenizer, length: int, rng: random.Random) -> list[int]:
    """length random token ids, none of them special (role markers, end of turn)."""
    ids: list[int] = []
    while len(ids) < length:
        token = rng.randrange(tokenizer.vocab_size)
        if token not in tokenizer.special_ids:
            ids.append(token)
    return ids


@contextmanager
def engine_for(subject: Subject, args: argparse.Namespace, **options: Any) -> Iterator[InferenceEngine]:
    options = {"torch_threads": args.threads, "max_batch": 32, **options}
    engine = InferenceEngine(subject.loaded, **options)
    try:
        yield engine
    finally:
        engine.close()


# ---- measuring our engine ----------------------------------------------------------------


async def timed(
    engine: InferenceEngine, prompt: list[int], params: SamplingParams, key: str | None = None, delay: float = 0.0
) -> Timed:
    await asyncio.sleep(delay)
    start, first, tokens = time.perf_counter(), float("nan"), []
    async with aclosing(engine.stream_tokens(prompt, params, key)) as stream:
        async for token in stream:
            if not tokens:
                first = time.perf_counter() - start
            tokens.append(token)
    return Timed(tokens, first, time.perf_counter() - start)


async def concurrent(
    engine: InferenceEngine, prompts: list[list[int]], arrivals: list[float], n: int
) -> tuple[list[Timed], float]:
    start = time.perf_counter()
    runs = await asyncio.gather(*(timed(engine, p, greedy(n), delay=a) for p, a in zip(prompts, arrivals)))
    return list(runs), time.perf_counter() - start


def engine_tokens_per_second(
    engine: InferenceEngine, prompt: list[int], n: int, repeats: int = 1
) -> tuple[float, list[int]]:
    """Median tokens/s of repeated runs (the whole request: prefill too), and the tokens."""
    asyncio.run(timed(engine, prompt, greedy(8)))  # warm-up
    runs = [asyncio.run(timed(engine, prompt, greedy(n))) for _ in range(repeats)]
    return statistics.median(len(r.tokens) / r.total for r in runs), runs[-1].tokens


def in_thread(threads: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a new thread with that many torch threads, which ends with it.

    Each system runs its torch work in a thread of its own that has ended (and freed its OpenMP
    team) before the next one starts, as our engine's worker does; the main thread keeps one
    torch thread (see model.engine.leave_threads_to_the_engine), so no system runs while another
    one's OpenMP team makes libgomp stop spinning between parallel regions.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        torch.set_num_threads(threads)
        try:
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


# ---- measuring transformers ----------------------------------------------------------------


class FirstToken:
    """A generate() streamer that notes when the first new tokens arrive (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at = float("nan")

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(hf: Any, prompts: list[list[int]], n: int, streamer: FirstToken | None = None) -> torch.Tensor:
    """Greedy generate(use_cache=True) of exactly n tokens; several prompts are left-padded into one batch."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    device = hf.device
    with torch.inference_mode():
        out = hf.generate(
            ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, do_sample=False,
            use_cache=True, streamer=streamer,
        )
    return out[:, width:].cpu()


def hf_tokens_per_second(hf: Any, prompt: list[int], n: int, repeats: int = 1) -> tuple[float, list[int]]:
    hf_generate(hf, [prompt], 8)  # warm-up
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = hf_generate(hf, [prompt], n)
        speeds.append(n / (time.perf_counter() - start))
    return statistics.median(speeds), out[0].tolist()


def hf_one_after_another(hf: Any, prompts: list[list[int]], arrivals: list[float], n: int) -> tuple[list[float], float]:
    """Requests served in arrival order, each alone; time to first token counts the wait."""
    start, firsts = time.perf_counter(), []
    for prompt, arrival in zip(prompts, arrivals):
        time.sleep(max(0.0, start + arrival - time.perf_counter()))
        streamer = FirstToken()
        hf_generate(hf, [prompt], n, streamer)
        firsts.append(streamer.at - (start + arrival))
    return firsts, time.perf_counter() - start


def hf_static_batch(hf: Any, prompts: list[list[int]], arrivals: list[float], n: int) -> tuple[list[float], float]:
    """One padded batch, started when the last request has arrived."""
    start = time.perf_counter()
    time.sleep(max(0.0, start + max(arrivals) - time.perf_counter()))
    streamer = FirstToken()
    hf_generate(hf, prompts, n, streamer)
    return [streamer.at - (start + a) for a in arrivals], time.perf_counter() - start


# ---- the sections ------------------------------------------------------------------------


def reference_tokens_per_second(
    model: GPT, prompt: list[int], n: int, use_cache: bool, repeats: int = 1
) -> tuple[float, list[int]]:
    """generate.generate_tokens: median tokens/s of repeated runs, and the tokens."""
    speeds = []
    with torch.inference_mode():
        list(generate_tokens(model, prompt, greedy(4), use_cache=use_cache))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            tokens = list(generate_tokens(model, prompt, greedy(n), use_cache=use_cache))
            speeds.append(len(tokens) / (time.perf_counter() - start))
    return statistics.median(speeds), tokens


def single_stream(s: Subject, args: argparse.Namespace) -> dict[str, Any]:
    """Ours and transformers' tokens/s, alternating round by round, then model.generate's decoder.

    This VM's bandwidth drifts by half within seconds, and one busy process beside a run on its 2
    cores slows it by up to 5x (transformers' SmolLM2 went from 17 to 3 tokens/s): each round runs a
    copy benchmark, ours (the engine then closed) and transformers, and the ratio is the median of
    the rounds' own ratios, as the fraction of the bandwidth limit is the median of our runs' own fractions.
    """
    prompt = random_prompt(s.loaded.tokenizer, 32, random.Random(0))
    apart = in_thread(args.threads, logit_gap, prepare(s.loaded.model, "float32"), s.hf, prompt)
    rounds = []
    for _ in range(max(3, s.repeats)):
        with engine_for(s, args) as engine:
            bandwidth = in_thread(args.threads, copy_bandwidth, torch.device(args.device))
            ours, ours_tokens = engine_tokens_per_second(engine, prompt, args.tokens)
        hf, hf_tokens = in_thread(args.threads, hf_tokens_per_second, s.hf, prompt, args.tokens)
        rounds.append((bandwidth, ours, hf))
    model, n = s.loaded.model, args.tokens
    cached, a = in_thread(args.threads, reference_tokens_per_second, model, prompt, n, True, s.repeats)
    uncached, b = in_thread(args.threads, reference_tokens_per_second, model, prompt, n, False, s.repeats)
    ratios = [ours / hf for _, ours, hf in rounds]
    return dict(ours=statistics.median(r[1] for r in rounds), hf=statistics.median(r[2] for r in rounds),
                ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)),
                same_as_hf=ours_tokens == hf_tokens, logit_gap=apart, cached=cached, uncached=uncached,
                same_cache=a == b == ours_tokens, rounds=[(bandwidth, ours) for bandwidth, ours, _ in rounds])


def logit_gap(model: GPT, hf: Any, prompt: list[int]) -> float:
    """The largest difference between our (engine's) model's logits and transformers' over the prompt's positions."""
    ids = torch.tensor([prompt], device=hf.device)
    with torch.inference_mode():
        ours, _ = model(ids)  # (1, T, vocab)
        return (ours - hf(ids).logits).abs().max().item()


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second a tensor copy moves (read + write), the best of a few runs."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decoding step reads: every linear layer (the LM head too) and layer norm.

    The embedding tables give one row per token and are left out; the tied LM head reads wte whole.
    """
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, CpuLinear, PackedLinear, nn.LayerNorm, nn.RMSNorm)):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        elif isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # int8 weight, fp32 bias
            weight, bias = module.weight(), module.bias()
            total += weight.numel() + (bias.numel() * 4 if bias is not None else 0)
    return total


def concurrency(s: Subject, args: argparse.Namespace, n: int, gap: float) -> dict[str, tuple[float, ...]]:
    """n conversations arriving gap seconds apart: ours, transformers one by one, transformers batched.

    Per system (tokens/s, time to first token p50, p95, total seconds), each the median of
    s.repeats rounds; a round runs the three systems one after the other, our engine closed
    before transformers starts.
    """
    rng = random.Random(n)
    low, high = s.prompt_lengths
    prompts = [random_prompt(s.loaded.tokenizer, rng.randint(low, high), rng) for _ in range(n)]
    arrivals = [i * gap for i in range(n)]
    m = args.concurrent_tokens
    rounds: dict[str, list[tuple[float, ...]]] = {"ours": [], "serial": [], "static": []}
    in_thread(args.threads, hf_generate, s.hf, prompts[:1], 4)  # warm-up
    for _ in range(s.repeats):
        with engine_for(s, args) as engine:
            asyncio.run(timed(engine, prompts[0], greedy(4)))  # warm-up
            runs, total = asyncio.run(concurrent(engine, prompts, arrivals, m))
        assert all(len(r.tokens) == m for r in runs)
        rounds["ours"].append((n * m / total, *_p50_p95([r.first for r in runs]), total))
        for kind, system in (("serial", hf_one_after_another), ("static", hf_static_batch)):
            firsts, total = in_thread(args.threads, system, s.hf, prompts, arrivals, m)
            rounds[kind].append((n * m / total, *_p50_p95(firsts), total))
    return {kind: tuple(statistics.median(column) for column in zip(*values)) for kind, values in rounds.items()}


def multi_turn(s: Subject, args: argparse.Namespace) -> dict[str, list[tuple[float, int, int]]]:
    """Per variant and turn: (median time to first token, prompt tokens, reused tokens).

    Prompts come from the bot's own bot/prompt.py. Variants: no reuse; reuse with the
    window sliding turn by turn (the newest turns that fit); reuse with the window the bot
    keeps (its start kept while the turns fit, then dropped in a chunk: build_prompt's keep_from).
    """
    tokenizer = s.loaded.tokenizer
    params = greedy(s.reply_tokens, stop=sorted(tokenizer.special_ids))
    out = {}
    with engine_for(s, args) as engine:
        asyncio.run(timed(engine, tokenizer.encode("warm up"), greedy(4)))
        for variant, kept in [("no reuse", True), ("reuse, sliding window", False), ("reuse, bot window", True)]:
            # the median of at least 5 runs of the conversation: one run's turn times are noisy (the
            # same 23-token first turn took 27.6 to 36.3 ms across the variants of one run of 3)
            keys = [f"{variant}-{rep}" if variant != "no reuse" else None for rep in range(max(5, s.repeats))]
            runs = [asyncio.run(_conversation(engine, s, params, key, args.turns, kept)) for key in keys]
            out[variant] = [(statistics.median(r[t][0] for r in runs), runs[0][t][1], runs[0][t][2])
                            for t in range(args.turns)]
    return out


async def _conversation(
    engine: InferenceEngine, s: Subject, params: SamplingParams, key: str | None, turns: int, kept: bool
) -> list[tuple[float, int, int]]:
    tokenizer, template = s.loaded.tokenizer, PromptTemplate()
    history: list[Turn] = []
    first, result = None, []
    for i in range(turns):
        message = MESSAGES[i % len(MESSAGES)]
        fitted = build_prompt(template, tokenizer, persona=PERSONA, user_name="", history=history, message=message,
                              context_size=engine.context_size, reply_budget=s.reply_tokens,
                              keep_from=first if kept else None)
        first = fitted.first
        before = engine.stats().reused_tokens
        run = await timed(engine, fitted.ids, params, key)
        result.append((run.first, len(fitted.ids), engine.stats().reused_tokens - before))
        history += [Turn("user", message), Turn("bot", tokenizer.decode(run.tokens).strip())]
    return result


def precisions(s: Subject, args: argparse.Namespace, val: list[list[str]] | None) -> dict[str, tuple[float, float, float]]:
    """Per precision: single-stream tokens/s, 16-conversation aggregate tokens/s, validation bits per byte."""
    prompt = random_prompt(s.loaded.tokenizer, 32, random.Random(0))
    rng = random.Random(16)
    prompts = [random_prompt(s.loaded.tokenizer, rng.randint(*s.prompt_lengths), rng) for _ in range(16)]
    out = {}
    for precision in PRECISIONS:
        if precision == "int8" and args.device != "cpu":
            continue
        with engine_for(s, args, precision=precision) as engine:
            single, _ = engine_tokens_per_second(engine, prompt, args.tokens, s.repeats)
            totals = [asyncio.run(concurrent(engine, prompts, [0.0] * 16, args.concurrent_tokens))[1]
                      for _ in range(s.repeats)]
            bpb = float("nan")
            if val:
                bpb = in_thread(args.threads, _bits_per_byte, engine.loaded.model, s, val, args)
        out[precision] = (single, 16 * args.concurrent_tokens / statistics.median(totals), bpb)
    return out


def _bits_per_byte(model: nn.Module, s: Subject, val: list[list[str]], args: argparse.Namespace) -> float:
    with torch.inference_mode():
        return score(model, s.loaded.tokenizer, val, s.loaded.config.block_size,
                     device=torch.device(args.device))["bits_per_byte"]


def threads(s: Subject, args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """Single-stream tokens/s of ours and transformers' with 1 thread and with args.threads."""
    prompt = random_prompt(s.loaded.tokenizer, 32, random.Random(0))
    out = {}
    for n in sorted({1, args.threads}):
        with engine_for(s, args, torch_threads=n) as engine:
            ours, _ = engine_tokens_per_second(engine, prompt, args.tokens, s.repeats)
        out[n] = (ours, in_thread(n, hf_tokens_per_second, s.hf, prompt, args.tokens, s.repeats)[0])
    return out


# ---- models, data, output ------------------------------------------------------------------


def our_model(which: str, args: argparse.Namespace) -> LoadedModel:
    """One of MODELS: "shipped"; "gpt2", a seeded random GPT-2-small-sized GPT with the GPT-2 tokenizer;
    "smollm2", the GGUF file, its window the bot's default max_context."""
    if which == "shipped":
        return load_model(args.model, args.device)
    if which == "smollm2":
        if not args.smollm2.is_file():
            raise SystemExit(f"no {args.smollm2}: fetch it with `python run_bot.py pull`, or give --smollm2 PATH")
        return load_model(args.smollm2, args.device, max_context=Settings.model_fields["max_context"].default)
    torch.manual_seed(0)
    tokenizer = ChatTokenizer.from_gpt2_files(args.gpt2_tokenizer / "encoder.json", args.gpt2_tokenizer / "vocab.bpe")
    gpt2 = GPT(GPT2_SMALL).to(args.device).eval()
    return LoadedModel(model=gpt2, tokenizer=tokenizer, name="gpt2-small", config=GPT2_SMALL)


def their_model(which: str, loaded: LoadedModel, args: argparse.Namespace, workdir: Path) -> Any:
    """transformers' model with the same weights as ours, set to generate exactly the tokens asked for.

    GPT2LMHeadModel from export_gpt2 of our weights; for SmolLM2, LlamaForCausalLM from the same
    GGUF file, which transformers dequantizes to float32 as we do.
    """
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    if which == "smollm2":
        hf = AutoModelForCausalLM.from_pretrained(args.smollm2.parent, gguf_file=args.smollm2.name, dtype=torch.float32)
    else:
        folder = workdir / loaded.name
        export_gpt2(loaded.model, loaded.tokenizer, folder)
        hf = GPT2LMHeadModel.from_pretrained(folder)
    hf = hf.to(args.device).eval()
    hf.generation_config.eos_token_id = None  # exactly n tokens, as ours without stop ids
    hf.generation_config.pad_token_id = 0
    return hf


def subject(which: str, args: argparse.Namespace, workdir: Path) -> Subject:
    """Our model and transformers', with how much of each measurement that model gets."""
    loaded = our_model(which, args)
    hf = their_model(which, loaded, args, workdir)
    millions = loaded.model.num_params() / 1e6
    if which == "shipped":
        return Subject(which, f"shipped ({millions:.1f}M)", loaded, hf, (16, 128), 48, 1 if args.quick else 3,
                       levels=(1, 4, 16, 32))
    if which == "gpt2":
        return Subject(which, f"GPT-2 small size ({millions:.0f}M, random)", loaded, hf, (16, 160), 24, 1,
                       levels=(1, 4, 16, 32))
    # transformers one by one takes a minute for 16 conversations: one concurrency level; multi-turn
    # and precision would double the run and are measured on the other models
    return Subject(which, f"SmolLM2-135M-Instruct ({millions:.0f}M, Q4_1 as float32)", loaded, hf, (16, 160), 24, 1,
                   levels=(16,), optional=frozenset({"threads"}))


def serving_rss(which: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that loads one model and serves 32 conversations with it."""
    command = [sys.executable, __file__, "--rss-probe", which, "--model", str(args.model),
               "--gpt2-tokenizer", str(args.gpt2_tokenizer), "--smollm2", str(args.smollm2),
               "--device", args.device, "--threads", str(args.threads)]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def rss_probe(which: str, args: argparse.Namespace) -> None:
    # the engine keeps its own copy of the weights (packed on CPU): the loaded model is not kept
    engine = InferenceEngine(our_model(which, args), torch_threads=args.threads, max_batch=32)
    rng = random.Random(0)
    prompts = [random_prompt(engine.loaded.tokenizer, rng.randint(16, 128), rng) for _ in range(32)]
    asyncio.run(concurrent(engine, prompts, [0.0] * 32, 64))
    engine.close()
    print(_peak_rss_mib())


def validation(model_dir: Path, limit: int) -> list[list[str]] | None:
    """The held-out conversations of the shipped model's training run (see its config.json meta)."""
    meta = json.loads((model_dir / "config.json").read_text()).get("meta", {})
    paths = [(ROOT / d["path"]).resolve() for d in meta.get("data", [])]
    if not paths or not all(p.exists() for p in paths):
        return None
    conversations = [c for p in paths for c in load_corpus(p)]
    return split_by_conversation(conversations, meta["val_fraction"], meta["seed"])[1][:limit]


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Prints the table, or nothing when no model was measured for it."""
    if not rows:
        return
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def _bandwidth_row(name: str, rounds: list[tuple[float, float]], weight_bytes: int, ours: float) -> tuple[Any, ...]:
    """Table 2's row from the (copy bytes/s, our tokens/s) of each run."""
    copy = statistics.median(bandwidth for bandwidth, _ in rounds)
    fractions = [speed * weight_bytes / bandwidth for bandwidth, speed in rounds]
    return (name, len(rounds), copy / 1e9, weight_bytes / 1e6, copy / weight_bytes, ours,
            f"{statistics.median(fractions):.0%}", f"{min(fractions):.0%}-{max(fractions):.0%}")


def _turn_rows(
    name: str, turns: dict[str, list[tuple[float, int, int]]], variants: list[str], n: int
) -> list[tuple[Any, ...]]:
    """Table 4's rows for one model: turns 1, 5 and n, then the mean of turns 2..n."""
    picked = [(str(t + 1), [turns[v][t] for v in variants]) for t in sorted({0, 4, n - 1}) if t < n]
    means = [tuple(statistics.fmean(turn[i] for turn in turns[v][1:]) for i in range(3)) for v in variants]
    rows = []
    for label, values in [*picked, (f"2-{n}", means)]:
        first = [turns[v][0][0] for v in variants]
        rows.append((name if not rows else "", label, *(1000 * ttft for ttft, _, _ in values),
                     *(f"{prompt:.0f} ({reused:.0f})" for _, prompt, reused in values[1:]),
                     *(values[i][0] / first[i] for i in (1, 2))))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def _p50_p95(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one keeps the parent's peak across fork + exec
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _model_names(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names or not names <= set(MODELS):
        raise argparse.ArgumentTypeError(f"give some of {','.join(MODELS)}, separated by commas; got {text!r}")
    return [name for name in MODELS if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "shipped")
    parser.add_argument("--gpt2-tokenizer", type=Path,
                        default=Path(os.environ.get("GPT2_TOKENIZER_DIR", "/work/shared/data/gpt2-tokenizer")))
    parser.add_argument("--smollm2", type=Path, default=default_models_dir() / CATALOG[0].file_name,
                        help="SmolLM2-135M-Instruct's GGUF file (default: where run_bot.py pull puts it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, ours and theirs")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens of the single-stream runs")
    parser.add_argument("--concurrency", help="numbers of simultaneous conversations, such as 1,4,16,32 "
                        "(default: 1,4,16,32; SmolLM2 16)")
    parser.add_argument("--concurrent-tokens", type=int, default=64, help="new tokens per concurrent request")
    parser.add_argument("--stagger", type=float, default=1.0,
                        help="gap between concurrent arrivals, in decoding steps of a lone stream of ours")
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--val-conversations", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--models", type=_model_names, default=["shipped", "gpt2"],
                        help=f"which models to measure, some of {','.join(MODELS)} (default shipped,gpt2)")
    parser.add_argument("--rss-probe", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    leave_threads_to_the_engine()  # each measurement runs in a thread of its own: see in_thread
    if args.rss_probe:
        return rss_probe(args.rss_probe, args)
    if args.quick:
        args.tokens, args.concurrency, args.concurrent_tokens = 12, "1,4", 8
        args.turns, args.val_conversations = 5, 10
    val = validation(args.model, args.val_conversations)

    results: dict[str, dict[str, Any]] = {}
    started, load = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        for which in args.models:
            s = subject(which, args, Path(workdir))
            print(f"measuring {s.name} ...", file=sys.stderr)
            r = results.setdefault(s.name, {})
            r["single"] = single_stream(s, args)
            r["bytes"] = {p: bytes_per_token(prepare(s.loaded.model, p)) for p in PRECISIONS if p != "int8" or args.device == "cpu"}
            r["gap"] = args.stagger / r["single"]["ours"]
            levels = [int(n) for n in args.concurrency.split(",")] if args.concurrency else s.levels
            r["concurrency"] = {n: concurrency(s, args, n, r["gap"]) for n in levels}
            if "multi-turn" in s.optional:
                r["turns"] = multi_turn(s, args)
            if "precision" in s.optional:
                r["precision"] = precisions(s, args, val if which == "shipped" else None)
            if "threads" in s.optional:
                r["threads"] = threads(s, args)
            r["rss"] = serving_rss(which, args)
            del s  # one model pair in memory at a time

    _print(results, args, load, time.perf_counter() - started)


def _print(results: dict[str, dict[str, Any]], args: argparse.Namespace, load: float, seconds: float) -> None:
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}, "
          f"{args.threads} threads; command: python bench/engine_bench.py {' '.join(sys.argv[1:])}")
    print(f"{seconds / 60:.1f} minutes; load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} "
          f"at the end, on {os.cpu_count()} CPUs")
    table(f"1. Single stream: {args.tokens} new tokens, greedy, 32-token prompt (tokens/s; ours and transformers "
          "alternate, the medians of the rounds (see table 2), ratio: the median of the rounds' ratios; logit diff: "
          "the largest difference from transformers' logits over the prompt; the KV-cache columns are "
          "model.generate's decoder, same model)",
          ["model", "our engine", "transformers", "ratio", "rounds' range", "same tokens", "logit diff",
           "ours KV cache", "ours no cache", "cache speed-up", "same"],
          [(name, r["single"]["ours"], r["single"]["hf"], r["single"]["ratio"],
            "{:.1f}-{:.1f}".format(*r["single"]["ratio_range"]), r["single"]["same_as_hf"],
            f"{r['single']['logit_gap']:.1e}", r["single"]["cached"], r["single"]["uncached"],
            r["single"]["cached"] / r["single"]["uncached"], r["single"]["same_cache"])
           for name, r in results.items()])
    table("2. Memory-bandwidth limit: runs of our single stream, each right after a copy benchmark (read + write, "
          "the best of 5); batch-1 tokens/s x weight bytes per token over the copy's bytes/s; median of the runs",
          ["model", "runs", "copy GB/s", "MB/token", "limit tok/s", "ours tok/s", "of limit", "runs' range"],
          [_bandwidth_row(name, r["single"]["rounds"], r["bytes"]["float32"], r["single"]["ours"])
           for name, r in results.items()])
    table(f"3. Concurrent conversations: prompts of mixed lengths, arriving one every {args.stagger:g} "
          f"decoding step(s) of a lone stream (the gap), {args.concurrent_tokens} new tokens each, greedy",
          ["model (gap)", "conv.", "system", "tok/s", "vs serial", "TTFT p50 s", "TTFT p95 s", "total s"],
          [(f"{name} ({1000 * r['gap']:.1f} ms)" if n == min(r["concurrency"]) and kind == "ours" else "",
            n if kind == "ours" else "", label,
            c[kind][0], c[kind][0] / c["serial"][0], c[kind][1], c[kind][2], c[kind][3])
           for name, r in results.items() for n, c in r["concurrency"].items()
           for kind, label in [("ours", "our engine"), ("serial", "transformers one by one"),
                               ("static", "transformers static batch")]])
    variants = ["no reuse", "reuse, sliding window", "reuse, bot window"]
    table("4. Multi-turn: time to first token (ms) of one conversation; prompt tokens (of them reused from the cache); "
          "last row: mean of turns 2..",
          ["model", "turn", *(f"{v} ms" for v in variants), *(f"{v}: prompt (reused)" for v in variants[1:]),
           "sliding / turn 1", "bot window / turn 1"],
          [row for name, r in results.items() if "turns" in r
           for row in _turn_rows(name, r["turns"], variants, args.turns)])
    table(f"5. Precision: our engine, single stream ({args.tokens} tokens) and 16 conversations "
          f"({args.concurrent_tokens} tokens each); bits per byte on {args.val_conversations} validation conversations",
          ["model", "precision", "MB/token", "single tok/s", "16 conv. tok/s", "val bits/byte"],
          [(name if i == 0 else "", p, r["bytes"][p] / 1e6, *v)
           for name, r in results.items() if "precision" in r for i, (p, v) in enumerate(r["precision"].items())])
    table("6. Threads: single stream tokens/s", ["model", "threads", "our engine", "transformers", "ratio"],
          [(name if i == 0 else "", n, ours, hf, ours / hf)
           for name, r in results.items() if "threads" in r for i, (n, (ours, hf)) in enumerate(r["threads"].items())])
    table("7. Peak resident memory (MiB) of a process that loads the model and serves 32 conversations "
          "of 64 tokens with it (engine with 32 batch rows)",
          ["model", "peak RSS MiB"], [(name, r["rss"]) for name, r in results.items()])


if __name__ == "__main__":
    main()
