"""Quality of the engine's weight precisions: bits per byte on held-out conversations, and how often
(and where) greedy tokens differ from float32's, as tables.

Models: SmolLM2-135M-Instruct from its Q4_1 GGUF file (the bot's default; loaded dequantized to
float32), its Q8_0 sibling where one lies beside it (bench/quant_bench.py makes it; measured in
float32 and q8, what the bot runs it in), and the shipped model. Every figure comes from
model.inference_weights.prepare(model, precision): the engine's own weights and kernels. SmolLM2's
float32 is the Q4_1 file's weights, not the original model's: q4 packs them back exactly (and its
LM head, the file's Q8_0 token embedding, exactly into q8), so for this file q4 computes what
float32 does, while q8 rounds the 4-bit levels onto 8-bit steps of another scale.

Data: the held-out split of the shipped model's training run (its config.json meta: BYU CCC,
Synthetic-Persona-Chat and Topical-Chat, split_by_conversation with its fraction and seed), which
the shipped model never trained on; --conversations of them spread evenly over the split (so all
three corpora), the same for every model, and for the greedy prompts --prompts others.

Bits per byte: the sum of -log2 p(token | context) over the scored tokens, over the UTF-8 bytes of
the turn texts. Each conversation runs alone through the prepared model's forward (the prefill
path) as the engine prefills a prompt, in chunks of the bot's prefill_chunk tokens with a KV cache,
in one window of up to block_size tokens (longer ones in windows overlapping by half, as
model.evaluate does); log-probabilities are taken in float32.
- shipped: model.evaluate's convention: eos, then <|user|> text <|end|> <|bot|> text <|end|> ...;
  every token is scored, the markers too (they decode to no bytes).
- SmolLM2: the conversation rendered by the model's chat template as the bot's ChatPrompt gives it
  (a system message with the bot's default persona, then user and assistant messages); scored are
  the tokens of each user and assistant message's text and the <|im_end|> that closes it; the
  system message and the template's headers (<|im_start|>user\\n) are context only.
"top-1 differs" is the share of scored positions where the precision's most likely token is not
float32's, there with float32's own margin (top-1 minus top-2 logit).

Greedy agreement: each prompt is bot.prompt.build_prompt's (the model's chat template or our
template; the default persona; the conversation's first two turns as history and its third as the
new message, or its first alone), then --tokens tokens of model.generate.generate_tokens, greedy
with repetition penalty 1.0 (each token the argmax of the raw logits; the bot uses 1.1) and no stop
tokens, so every run has --tokens tokens. Margins at a divergence are float32's logits at that
position, from one forward pass of float32 over the prompt and its own greedy tokens.

Usage:

    python bench/quant_quality.py [--conversations 20] [--prompts 20] [--tokens 64]
                                  [--precisions float32,q8,q4,int8] [--threads 1] [--quick]

About 7.5 minutes of one core (11 minutes of wall time measured with other work on this 2-core
machine, load average 2.6 to 6.7; SmolLM2 takes most: 1-2 minutes a precision to score 13.5k
tokens, under a minute of greedy runs); --quick: 1-2 minutes. bfloat16, emulated on
most CPUs, is left out unless --precisions names it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine_bench import bytes_per_token, table, validation
from bot.config import Settings
from bot.prompt import ChatPrompt, PromptTemplate, Turn, build_prompt
from model.chat_template import ChatTemplate
from model.checkpoint import LoadedModel, load_model
from model.data import IGNORE_INDEX, Conversation, encode_conversation
from model.evaluate import positive, scoring_windows
from model.generate import SamplingParams, generate_tokens
from model.inference_weights import PRECISIONS, prepare
from model.pull import CATALOG, default_models_dir
from model.tokenizer import ChatTokenizer

PERSONA = Settings.model_fields["persona"].default
MAX_CONTEXT = Settings.model_fields["max_context"].default
PREFILL_CHUNK = Settings.model_fields["prefill_chunk"].default
STAND_IN = 0xF0000  # message i's text is rendered as chr(STAND_IN + i) to find where the template puts it


@dataclass
class Example:
    """One conversation as the model sees it: inputs and next-token targets (IGNORE_INDEX: context only)."""

    inputs: list[int]
    targets: list[int]
    n_bytes: int  # UTF-8 bytes the scored tokens decode to
    as_the_bot: bool = True  # the same ids as the bot's own encoding of these messages


@dataclass
class Subject:
    name: str
    loaded: LoadedModel
    precisions: list[str]


@dataclass
class Scores:
    """One precision's results at every scored position, in order; (N,) each."""

    nats: Tensor  # -ln p(target)
    top1: Tensor  # the most likely token
    margin: Tensor  # top-1 minus top-2 logit
    n_bytes: int
    seconds: float

    @property
    def bits_per_byte(self) -> float:
        return self.nats.sum().item() / math.log(2) / self.n_bytes


@dataclass
class Greedy:
    runs: list[list[int]]  # the new tokens after each prompt
    seconds: float


@dataclass
class Divergence:
    prompt: int  # index of the prompt
    position: int  # first new token that differs
    ours: int  # float32's token there
    theirs: int  # the precision's
    margin: float  # float32's top-1 minus top-2 logit there
    rank: int  # of the precision's token among float32's logits (1 = top-1)
    in_reply: bool  # before float32's reply ended (its first special token), so the bot's reply changes


# ---- the data --------------------------------------------------------------------------------


def spread(items: list[Conversation], n: int, offset: float = 0.0) -> list[Conversation]:
    """n items evenly spaced over the list, so that each corpus in it is represented."""
    return [items[int((i + offset) * len(items) / n)] for i in range(min(n, len(items)))]


def our_format_example(tokenizer: ChatTokenizer, turns: Conversation) -> Example:
    """model.evaluate's scoring of our chat format: every token, over the bytes of the turn texts."""
    inputs, targets = encode_conversation(tokenizer, turns)
    return Example(inputs, targets, len(tokenizer.decode(targets).encode()))


def chat_messages(turns: Conversation) -> list[dict[str, str]]:
    """The bot's messages for a conversation (as ChatPrompt.messages): persona as system, then alternating turns."""
    roles = ("user", "assistant")
    return [{"role": "system", "content": PERSONA}, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]


def chat_template_example(tokenizer: ChatTokenizer, template: ChatTemplate, turns: Conversation) -> Example:
    """The conversation through the chat template; scored: each turn's text tokens and the end-of-turn after them.

    The template's own text and the messages' texts are encoded apart (as ChatTemplate.encode does
    when it has to) to know which tokens are whose; as_the_bot says whether that gives the ids
    the bot's encoding gives.
    """
    messages = chat_messages(turns)
    shape = template.render([{**m, "content": chr(STAND_IN + i)} for i, m in enumerate(messages)],
                            add_generation_prompt=False)
    ids: list[int] = []
    scored: list[bool] = []
    n_bytes, after_text = 0, False
    for piece in re.split(f"([{chr(STAND_IN)}-{chr(STAND_IN + len(messages) - 1)}])", shape):
        if len(piece) == 1 and ord(piece) >= STAND_IN:
            i = ord(piece) - STAND_IN
            text = tokenizer.encode(messages[i]["content"])
            ids += text
            after_text = i > 0  # the system message is context
            scored += [after_text] * len(text)
            n_bytes += len(tokenizer.decode(text).encode()) if after_text else 0
        elif piece:
            marks = tokenizer.encode_with_specials(piece)
            ids += marks
            scored += [after_text and j == 0 and token == tokenizer.eos_id for j, token in enumerate(marks)]
            after_text = False
    targets = [token if keep else IGNORE_INDEX for token, keep in zip(ids[1:], scored[1:])]
    same = ids == template.encode(tokenizer, messages, add_generation_prompt=False)
    return Example(ids[:-1], targets, n_bytes, same)


def examples(loaded: LoadedModel, conversations: list[Conversation]) -> list[Example]:
    """The conversations as the bot shows them to this model: its chat template where it has one, else our format."""
    tokenizer = loaded.tokenizer
    if tokenizer.chat_template is None:
        return [our_format_example(tokenizer, turns) for turns in conversations]
    template = ChatTemplate.for_tokenizer(tokenizer)
    return [chat_template_example(tokenizer, template, turns) for turns in conversations]


def prompts(loaded: LoadedModel, conversations: list[Conversation], reply_tokens: int) -> list[list[int]]:
    """The bot's prompts (its template choice: the model's chat template, else ours) for each conversation's
    third turn after its first two, or its first turn alone."""
    tokenizer = loaded.tokenizer
    template = ChatPrompt.for_tokenizer(tokenizer) if tokenizer.chat_template is not None else PromptTemplate()
    out = []
    for turns in conversations:
        history = [Turn("user", turns[0]), Turn("bot", turns[1])] if len(turns) >= 3 else []
        fitted = build_prompt(template, tokenizer, persona=PERSONA, user_name="", history=history,
                              message=turns[len(history)], context_size=loaded.config.block_size,
                              reply_budget=reply_tokens)
        out.append(fitted.ids)
    return out


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Measured:
    """Everything one model's tables need."""

    tokenizer: ChatTokenizer
    data: list[Example]
    weight_bytes: dict[str, int]  # per precision: what a decoding step reads (bench/engine_bench.py)
    scores: dict[str, Scores]
    greedy: dict[str, Greedy]
    divergences: dict[str, list[Divergence]]  # per precision, at most one per prompt
    step_margins: Tensor  # float32's top-1 minus top-2 logit at each of its greedy steps, all prompts


@torch.inference_mode()
def score(model: nn.Module, data: list[Example], block_size: int) -> Scores:
    """Every scored position of every conversation, each conversation alone (no padding beside it in a batch)."""
    start = time.perf_counter()
    nats, top1, margin = [], [], []
    for example in data:
        for inputs, targets in scoring_windows(example.inputs, example.targets, block_size):
            y = torch.tensor(targets)
            keep = y != IGNORE_INDEX
            rows = prefill_logits(model, inputs)[keep].float()  # (n, vocab)
            nats.append(-rows.log_softmax(-1).gather(1, y[keep].unsqueeze(1)).squeeze(1))
            best = rows.topk(2, dim=-1)
            top1.append(best.indices[:, 0])
            margin.append(best.values[:, 0] - best.values[:, 1])
    return Scores(torch.cat(nats), torch.cat(top1), torch.cat(margin), sum(e.n_bytes for e in data),
                  time.perf_counter() - start)


def prefill_logits(model: nn.Module, inputs: list[int]) -> Tensor:
    """Logits (T, vocab) of inputs run as the engine prefills a prompt: in chunks of PREFILL_CHUNK tokens, each
    after the keys and values of those before it (int8 quantizes each chunk's activations with one scale)."""
    cache = model.new_kv_cache()
    return torch.cat([model(torch.tensor([inputs[start : start + PREFILL_CHUNK]]), kv_cache=cache, start_pos=start)[0][0]
                      for start in range(0, len(inputs), PREFILL_CHUNK)])


def greedy(model: nn.Module, prompt_ids: list[list[int]], n: int) -> Greedy:
    """n greedy tokens after each prompt (argmax of the raw logits: no repetition penalty, no stop)."""
    params = SamplingParams(temperature=0, repetition_penalty=1.0, max_new_tokens=n, seed=0)
    start = time.perf_counter()
    runs = [list(generate_tokens(model, ids, params)) for ids in prompt_ids]
    return Greedy(runs, time.perf_counter() - start)


@torch.inference_mode()
def reference_logits(model: nn.Module, prompt_ids: list[int], tokens: list[int]) -> Tensor:
    """The model's logits (n, vocab) before each of its own n greedy tokens, in one forward pass."""
    logits, _ = model(torch.tensor([prompt_ids + tokens[:-1]]))
    return logits[0, len(prompt_ids) - 1 :].float()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def divergence(
    prompt: int, ours: list[int], theirs: list[int], logits: Tensor, special: frozenset[int]
) -> Divergence | None:
    """Where theirs first leaves float32's tokens ours (logits: float32's before each of ours); None if never."""
    at = common_prefix(ours, theirs)
    if at == min(len(ours), len(theirs)):
        return None
    row = logits[at]  # (vocab,)
    top = row.topk(2).values
    reply_end = next((i for i, token in enumerate(ours) if token in special), len(ours))
    return Divergence(prompt, at, ours[at], theirs[at], (top[0] - top[1]).item(),
                      int((row > row[theirs[at]]).sum()) + 1, at <= reply_end)


def measure(
    subject: Subject, conversations: list[Conversation], prompt_conversations: list[Conversation],
    args: argparse.Namespace,
) -> Measured:
    """Scores and greedy runs of each precision of one model, and where the runs leave float32's."""
    loaded = subject.loaded
    data = examples(loaded, conversations)
    prompt_ids = prompts(loaded, prompt_conversations, args.tokens)
    weight_bytes, scores, runs = {}, {}, {}
    for precision in subject.precisions:
        print(f"  {precision}", file=sys.stderr, flush=True)
        model = prepare(loaded.model, precision)
        weight_bytes[precision] = bytes_per_token(model)
        scores[precision] = score(model, data, loaded.config.block_size)
        runs[precision] = greedy(model, prompt_ids, args.tokens)
        if precision == "float32":
            reference = model
    special = loaded.tokenizer.special_ids
    divergences: dict[str, list[Divergence]] = {p: [] for p in subject.precisions}
    step_margins = []
    for i, ids in enumerate(prompt_ids):
        ours = runs["float32"].runs[i]
        logits = reference_logits(reference, ids, ours)
        top = logits.topk(2, dim=-1).values
        step_margins.append(top[:, 0] - top[:, 1])
        for precision in subject.precisions:
            found = divergence(i, ours, runs[precision].runs[i], logits, special)
            if found:
                divergences[precision].append(found)
    return Measured(loaded.tokenizer, data, weight_bytes, scores, runs, divergences, torch.cat(step_margins))


# ---- the models ------------------------------------------------------------------------------


def subjects(args: argparse.Namespace) -> Iterator[Subject]:
    """The models to measure, each loaded when its turn comes: SmolLM2's file, its Q8_0 sibling, the shipped model."""
    if args.smollm2.is_file():
        loaded = load_model(args.smollm2, max_context=MAX_CONTEXT)
        yield Subject(f"SmolLM2-135M ({loaded.stored_as} file)", loaded, args.precisions)
        sibling = args.smollm2.with_name(args.smollm2.name.replace("Q4_1", "Q8_0"))
        if sibling != args.smollm2 and sibling.is_file():
            loaded = load_model(sibling, max_context=MAX_CONTEXT)
            kept = [p for p in args.precisions if p in ("float32", "q8")]  # q8: what the bot runs a Q8_0 file in
            yield Subject(f"SmolLM2-135M ({loaded.stored_as} file)", loaded, kept)
    else:
        print(f"no {args.smollm2}: fetch it with `python run_bot.py pull`, or give --smollm2 PATH", file=sys.stderr)
    loaded = load_model(args.model)
    yield Subject(f"shipped ({loaded.model.num_params() / 1e6:.1f}M)", loaded, args.precisions)


# ---- output ----------------------------------------------------------------------------------


def data_table(results: dict[str, Measured]) -> None:
    rows = []
    for name, m in results.items():
        scored = sum(sum(t != IGNORE_INDEX for t in e.targets) for e in m.data)
        rows.append((name, len(m.data), sum(len(e.inputs) for e in m.data), scored, sum(e.n_bytes for e in m.data),
                     f"{sum(e.as_the_bot for e in m.data)}/{len(m.data)}"))
    table("1. Data per model: held-out conversations, tokens run through the model, tokens scored, bytes those "
          "decode to; as the bot: conversations whose ids are the bot's own encoding of the same messages",
          ["model", "conversations", "tokens", "scored", "bytes", "as the bot"], rows)


def bits_table(results: dict[str, Measured]) -> None:
    rows = []
    for name, m in results.items():
        base = m.scores["float32"]
        for i, (precision, s) in enumerate(m.scores.items()):
            change = s.bits_per_byte - base.bits_per_byte
            differs = s.top1 != base.top1
            rows.append((name if i == 0 else "", precision, m.weight_bytes[precision] / 1e6, s.bits_per_byte,
                         f"{change:+.4f} ({_percent(change, base.bits_per_byte)})",
                         (s.nats - base.nats).abs().mean().item(), _percent(int(differs.sum()), len(differs)),
                         base.margin[differs].median().item() if differs.any() else float("nan"),
                         base.margin.median().item(), s.seconds))
    table("2. Bits per byte on the held-out conversations (prefill path, each conversation alone); |d nats|: mean "
          "absolute change of -ln p(token) from float32's; top-1 differs: scored positions whose most likely token "
          "is not float32's; f32 margin: float32's top-1 minus top-2 logit where they differ, and at all positions "
          "(medians)",
          ["model", "precision", "MB/token", "bits/byte", "vs float32", "|d nats|", "top-1 differs",
           "f32 margin there", "f32 margin all", "seconds"], rows)


def greedy_table(results: dict[str, Measured], args: argparse.Namespace) -> None:
    rows = []
    for name, m in results.items():
        base = m.greedy["float32"].runs
        for i, (precision, g) in enumerate(m.greedy.items()):
            prefixes = [common_prefix(a, b) for a, b in zip(base, g.runs)]
            found = m.divergences[precision]
            below = [_share_below(m.step_margins, d.margin) for d in found]
            rows.append((name if i == 0 else "", precision, f"{len(g.runs) - len(found)}/{len(g.runs)}",
                         f"{statistics.median(prefixes):.1f}", f"{statistics.fmean(prefixes):.1f}",
                         f"{sum(d.in_reply for d in found)}/{len(found)}", _median([d.margin for d in found]),
                         f"{100 * _median(below):.1f}%" if below else "n/a",
                         f"{sum(d.rank == 2 for d in found)}/{len(found)}", g.seconds))
    table(f"3. Greedy agreement with float32: {args.prompts} held-out prompts, {args.tokens} new tokens each "
          "(repetition penalty 1.0, no stop); identical: prompts whose tokens are all float32's; common prefix in "
          "tokens; in reply: divergences at or before float32's first end-of-turn (the bot's reply changes); f32 "
          "margin at the first differing token (median); steps below: share of all float32's greedy steps with a "
          "smaller margin (median over divergences); its 2nd: the precision's token is float32's second choice",
          ["model", "precision", "identical", "prefix median", "prefix mean", "in reply", "f32 margin there",
           "steps below", "its 2nd", "seconds"], rows)


def margins_table(results: dict[str, Measured]) -> None:
    rows = [(name, len(m.step_margins), m.step_margins.median().item(), m.step_margins.quantile(0.1).item(),
             f"{100 * _share_below(m.step_margins, 0.1):.1f}%", f"{100 * _share_below(m.step_margins, 0.5):.1f}%")
            for name, m in results.items()]
    table("4. For scale: float32's margin (top-1 minus top-2 logit) over all its greedy steps",
          ["model", "steps", "median", "10th percentile", "below 0.1", "below 0.5"], rows)


def divergences_table(results: dict[str, Measured]) -> None:
    rows = [(name, precision, d.prompt, d.position, _token(m.tokenizer, d.ours), _token(m.tokenizer, d.theirs),
             f"{d.margin:.4f}", d.rank, f"{100 * _share_below(m.step_margins, d.margin):.1f}%", d.in_reply)
            for name, m in results.items() for precision, found in m.divergences.items() for d in found]
    table("5. Every divergence: the prompt, the position of the first differing new token, float32's token and "
          "the precision's, float32's margin there, the precision's token's rank among float32's logits, the share "
          "of float32's greedy steps with a smaller margin, whether float32's reply had not ended",
          ["model", "precision", "prompt", "position", "float32", "precision's", "f32 margin", "rank",
           "steps below", "in reply"], rows)


def _share_below(margins: Tensor, value: float) -> float:
    return (margins < value).float().mean().item()


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _token(tokenizer: ChatTokenizer, token: int) -> str:
    if token in tokenizer.special_ids:
        return "<end of turn>" if token == tokenizer.eos_id else f"<special {token}>"
    return repr(tokenizer.decode([token]))[:16]


def _precision_list(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    if not names <= set(PRECISIONS) or "float32" not in names:
        raise argparse.ArgumentTypeError(f"give some of {','.join(PRECISIONS)}, float32 among them; got {text!r}")
    return [name for name in PRECISIONS if name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "model" / "shipped", help="the shipped model's folder")
    parser.add_argument("--smollm2", type=Path, default=default_models_dir() / CATALOG[0].file_name,
                        help="SmolLM2-135M-Instruct's GGUF file (default: where run_bot.py pull puts it)")
    parser.add_argument("--conversations", type=positive(int), default=20, help="held-out conversations to score")
    parser.add_argument("--prompts", type=positive(int), default=20, help="held-out prompts for the greedy runs")
    parser.add_argument("--tokens", type=positive(int), default=64, help="greedy tokens per prompt")
    parser.add_argument("--precisions", type=_precision_list, default=["float32", "q8", "q4", "int8"],
                        help=f"some of {','.join(PRECISIONS)} (default float32,q8,q4,int8: bfloat16 is slow on CPU)")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch threads (default 1: the figures do not depend on it, and with another process "
                        "on the cores one thread ran 3-6x faster than two, whose OpenMP threads wait for each other)")
    parser.add_argument("--quick", action="store_true", help="3 conversations, 4 prompts of 16 tokens")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.prompts, args.tokens = 3, 4, 16
    torch.set_num_threads(args.threads)
    started, load = time.perf_counter(), os.getloadavg()[0]

    held_out = validation(args.model, sys.maxsize)
    if not held_out:
        raise SystemExit(f"the held-out data named in {args.model / 'config.json'} is not there")
    conversations = spread(held_out, args.conversations)
    prompt_conversations = spread(held_out, args.prompts, offset=0.5)  # between the scored ones
    results = {}
    for subject in subjects(args):
        print(f"measuring {subject.name} ...", file=sys.stderr, flush=True)
        results[subject.name] = measure(subject, conversations, prompt_conversations, args)

    print("command:", " ".join(["python", "bench/quant_quality.py", *sys.argv[1:]]))
    print(f"torch {torch.__version__}, {args.threads} threads; {(time.perf_counter() - started) / 60:.1f} minutes; "
          f"load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} CPUs")
    print(f"held-out split of {args.model / 'config.json'}'s data: {len(held_out)} conversations, "
          f"{len(conversations)} of them scored and {len(prompt_conversations)} others as prompts")
    data_table(results)
    bits_table(results)
    greedy_table(results, args)
    margins_table(results)
    divergences_table(results)


if __name__ == "__main__":
    main()
