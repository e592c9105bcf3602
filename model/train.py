"""The training loop (a Trainer that knows nothing about GPT) and the `train` command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model.checkpoint import CheckpointError, load_model, save_checkpoint
from model.config import GPTConfig
from model.data import Conversation, TokenStream, conversation_ids, load_corpus, split_by_conversation
from model.evaluate import DATA_HELP, PRECISIONS, autocast, format_report, parse_number, positive, resolve_device, score
from model.gpt import GPT
from model.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"  # latest weights + optimizer + counters, beside the best checkpoint


@dataclass
class TrainerConfig:
    """How to optimise. A run ends at max_steps or max_seconds, whichever comes first."""

    batch_size: int = 16
    block_size: int = 256  # tokens per training window
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    decay: str = "cosine"  # or "linear"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_seconds: float | None = None  # wall time of the loop, periodic evaluations included
    eval_every: int = 250
    seed: int = 0
    compile: bool = False  # torch.compile the training forward/backward (slow first step, then faster)
    precision: str = "auto"  # "fp32", "bf16" (autocast; weights and optimizer stay float32) or "auto"

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("give a step limit, a time limit or both")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be cosine or linear; got {self.decay!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")


def make_optimizer(model: nn.Module, config: TrainerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only matrices (linear and embedding weights), not biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


def learning_rate(config: TrainerConfig, step: int, progress: float) -> float:
    """Linear warm-up over warmup_steps, then cosine or linear decay over the rest of the run (progress 0..1)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    floor, progress = config.lr * config.min_lr_ratio, min(progress, 1.0)
    if config.decay == "linear":
        return floor + (config.lr - floor) * (1.0 - progress)
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Optimises any module whose forward(inputs, targets) returns (logits, mean loss).

    Batches are random windows of train_data. Every eval_every steps and at the end it
    calls evaluate(model) -> validation loss; on a new best it calls on_best(model, progress)
    (to write a checkpoint), then saves its own state to state_path for resuming.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainerConfig,
        train_data: TokenStream,
        evaluate: Callable[[nn.Module], float],
        on_best: Callable[[nn.Module, dict[str, Any]], None],
        *,
        state_path: Path,
        device: torch.device,
    ) -> None:
        self.model = model.to(device)
        # The compiled wrapper only runs steps; weights are saved from the plain module (no key prefix).
        self._forward: Callable[..., Any] = torch.compile(self.model) if config.compile else self.model
        self.config = config
        self.train_data = train_data
        self.evaluate = evaluate
        self.on_best = on_best
        self.state_path = state_path
        self.device = device
        self.optimizer = make_optimizer(self.model, config, device)
        self.generator = torch.Generator().manual_seed(config.seed)  # batch positions
        self.step = 0
        self.tokens_seen = 0
        self.seconds = 0.0  # loop time over all sessions of this run
        self.best_val_loss = math.inf

    def progress(self) -> float:
        """How much of the run is done, 0..1: the further of the step and time limits."""
        c = self.config
        done = []
        if c.max_steps is not None:
            done.append((self.step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        if c.max_seconds is not None:
            done.append(self.seconds / c.max_seconds)
        return min(1.0, max(0.0, *done))

    def finished(self) -> bool:
        c = self.config
        return (c.max_steps is not None and self.step >= c.max_steps) or (
            c.max_seconds is not None and self.seconds >= c.max_seconds
        )

    def run(self) -> None:
        """Train until a limit is reached; the best weights go to on_best, the latest to state_path."""
        self.model.train()
        session_start, seconds_before, steps_before = time.monotonic(), self.seconds, self.step
        train_seconds, train_tokens, loss_avg = 0.0, 0, None
        bar = tqdm(total=self.config.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        with bar, logging_redirect_tqdm():
            while not self.finished():
                t0 = time.monotonic()
                loss = self._train_step()
                train_seconds += time.monotonic() - t0
                train_tokens += self._tokens_per_step()
                loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
                self.seconds = seconds_before + time.monotonic() - session_start
                if self.step % self.config.eval_every == 0:
                    self._evaluate(loss_avg)
                    self.seconds = seconds_before + time.monotonic() - session_start
                per_step = (self.seconds - seconds_before) / (self.step - steps_before)
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {loss_avg:.3f}, {train_tokens / train_seconds:,.0f} tok/s, "
                    f"left {_clock(self._seconds_left(per_step))}"
                )
            if self.step > steps_before and self.step % self.config.eval_every != 0:
                self._evaluate(loss_avg)

    def _tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.config.block_size

    def _train_step(self) -> float:
        """One optimizer step over grad_accum micro-batches; returns their mean loss."""
        c = self.config
        lr = learning_rate(c, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(c.grad_accum):
            x, y = self.train_data.sample(c.batch_size, c.block_size, self.generator)
            with autocast(self.device, c.precision):
                _, loss = self._forward(x.to(self.device), y.to(self.device))
            (loss / c.grad_accum).backward()
            total += loss.item()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self._tokens_per_step()
        return total / c.grad_accum

    def _evaluate(self, train_loss: float | None) -> None:
        val_loss = self.evaluate(self.model)
        self.model.train()
        train = "" if train_loss is None else f"train loss {train_loss:.4f}, "
        log.info("step %d: %sval loss %.4f", self.step, train, val_loss)
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.on_best(self.model, self.counters())
        self.save_state()

    def _seconds_left(self, per_step: float) -> float:
        c = self.config
        left = []
        if c.max_steps is not None:
            left.append((c.max_steps - self.step) * per_step)
        if c.max_seconds is not None:
            left.append(c.max_seconds - self.seconds)
        return max(0.0, min(left))

    def counters(self) -> dict[str, Any]:
        """Where the run stands, for checkpoint meta."""
        return {
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "training_seconds": round(self.seconds, 1),
            "eval_loss": self.best_val_loss,  # on the periodic-evaluation part of the validation data
        }

    def save_state(self) -> None:
        """Latest weights, optimizer moments and counters: tensors and numbers only (weights_only-loadable)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "best_val_loss": self.best_val_loss,
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)  # a crash mid-write leaves the previous state intact

    def load_state(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"].cpu())
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.seconds = state["seconds"]
        self.best_val_loss = state["best_val_loss"]


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


MODEL_DEFAULTS = {"vocab_size": 4096, "layers": 4, "heads": 4, "width": 256, "context": 256, "dropout": 0.0}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data and output")
    data.add_argument("--data", type=Path, action="append", required=True, metavar="PATH", help=DATA_HELP)
    data.add_argument("--out", type=Path, required=True, metavar="DIR", help="model folder to write")
    data.add_argument(
        "--resume", action="store_true",
        help=f"continue the run in --out from its {STATE_FILE}, keeping its model shape and tokenizer",
    )
    data.add_argument(
        "--val-fraction", type=_fraction, default=0.05, metavar="F", help="conversations held out (default 0.05)"
    )
    data.add_argument("--seed", type=int, default=0, metavar="N", help="seeds split, weights, batches (default 0)")

    shape = parser.add_argument_group("model (new runs only)")
    shape.add_argument("--vocab-size", type=positive(int), metavar="N", help="tokenizer size (default 4096)")
    shape.add_argument("--layers", type=positive(int), metavar="N", help="transformer blocks (default 4)")
    shape.add_argument("--heads", type=positive(int), metavar="N", help="attention heads (default 4)")
    shape.add_argument("--width", type=positive(int), metavar="N", help="embedding width (default 256)")
    shape.add_argument("--context", type=positive(int), metavar="N", help="context in tokens (default 256)")
    shape.add_argument("--dropout", type=_fraction, metavar="F", help="dropout (default 0.0)")
    shape.add_argument("--pos-encoding", choices=("learned", "sinusoidal"), help="default: learned")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=positive(int), default=16, metavar="N", help="windows per micro-batch (16)")
    opt.add_argument("--grad-accum", type=positive(int), default=1, metavar="N", help="micro-batches per step (1)")
    opt.add_argument("--lr", type=positive(float), default=1e-3, metavar="F", help="peak learning rate (1e-3)")
    opt.add_argument(
        "--decay", choices=("cosine", "linear"), default="cosine",
        help="learning-rate decay after the warm-up (default cosine)",
    )
    opt.add_argument(
        "--min-lr-ratio", type=_unit, default=0.1, metavar="F",
        help="the decay ends at this fraction of --lr (default 0.1; 0 decays to zero)",
    )
    opt.add_argument("--warmup", type=_non_negative_int, default=100, metavar="N", help="warm-up steps (100)")
    opt.add_argument("--steps", type=positive(int), metavar="N", help="stop at this step (resumed steps count)")
    opt.add_argument("--minutes", type=positive(float), metavar="M", help="stop after this much training time in all")
    opt.add_argument("--eval-every", type=positive(int), default=250, metavar="N", help="steps between evals (250)")
    opt.add_argument(
        "--eval-tokens", type=positive(int), default=50_000, metavar="N",
        help="validation tokens scored at each periodic evaluation; the final one scores all (50000)",
    )
    opt.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    opt.add_argument("--threads", type=positive(int), metavar="N", help="torch CPU threads (default: torch's)")
    opt.add_argument(
        "--compile", action="store_true",
        help="torch.compile the training step: a minute or so to compile, then faster (1.15x for a 4.3 M model here)",
    )
    opt.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="forward pass in bf16 autocast (weights and optimizer stay float32) or fp32; auto: bf16 on CUDA, "
        "fp32 on CPU. A CPU with AVX512-BF16 or AMX trains about 2x faster in bf16 (1.95x for a 2.6 M model, "
        "compiled, on this machine); elsewhere it is emulated and slower",
    )


def _non_negative_int(text: str) -> int:
    value = parse_number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _unit(text: str) -> float:
    value = parse_number(float, text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _fraction(text: str) -> float:
    value = parse_number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def run_train(args: argparse.Namespace) -> int:
    """Train on --data into --out; 2 on a usage error, 130 when interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        trainer, checkpoints, val = _prepare(args)
    except (ValueError, CheckpointError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    try:
        trainer.run()
    except KeyboardInterrupt:
        print(f"\ntrain: interrupted; --resume continues from the last evaluation in {args.out}", file=sys.stderr)
        return 130
    print(format_report(_finish(trainer, checkpoints, val)))
    return 0


@dataclass
class _Checkpoints:
    """Writes weights and tokenizer to the output folder, with what the run was made of as meta."""

    out: Path
    tokenizer: ChatTokenizer
    meta: dict[str, Any]

    def save(self, model: nn.Module, extra: dict[str, Any]) -> None:
        save_checkpoint(self.out, model, self.tokenizer, {**self.meta, **extra})


def _prepare(args: argparse.Namespace) -> tuple[Trainer, _Checkpoints, list[Conversation]]:
    """Check arguments, read and split the data, build or reload model and tokenizer, make the Trainer."""
    if args.steps is None and args.minutes is None:
        raise ValueError("say how long to train: --steps N, --minutes M or both")
    state_path = args.out / STATE_FILE
    _check_out(args, state_path)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    sources, conversations = [], []
    for path in args.data:
        convs = load_corpus(path)
        sources.append({"path": str(path), "conversations": len(convs)})
        conversations += convs
    train, val = split_by_conversation(conversations, args.val_fraction, args.seed)
    if not val:
        raise ValueError(f"no validation conversations out of {len(conversations)}: raise --val-fraction")
    log.info("%d training and %d validation conversations", len(train), len(val))

    if args.resume:
        loaded = load_model(args.out, str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = _new_model(args, train)
    block_size = model.config.block_size
    stream = TokenStream.from_conversations(tokenizer, train)
    if len(stream) <= block_size:
        raise ValueError(f"the training data has {len(stream)} tokens, fewer than one window of {block_size + 1}")
    log.info("%s training tokens; %s parameters", f"{len(stream):,}", f"{model.num_params():,}")

    config = TrainerConfig(
        batch_size=args.batch_size,
        block_size=block_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr_ratio=args.min_lr_ratio,
        decay=args.decay,
        warmup_steps=args.warmup,
        max_steps=args.steps,
        max_seconds=None if args.minutes is None else args.minutes * 60,
        eval_every=args.eval_every,
        seed=args.seed,
        compile=args.compile,
        precision=args.precision,
    )
    checkpoints = _Checkpoints(args.out, tokenizer, {
        "data": sources,
        "train_conversations": len(train),
        "val_conversations": len(val),
        "train_tokens": len(stream),
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "trainer": asdict(config),
    })
    eval_convs = _first_tokens(tokenizer, val, args.eval_tokens)
    trainer = Trainer(
        model,
        config,
        stream,
        lambda m: score(m, tokenizer, eval_convs, block_size, device=device)["loss"],
        checkpoints.save,
        state_path=state_path,
        device=device,
    )
    if args.resume:
        trainer.load_state()
        log.info("resuming at step %d", trainer.step)
    return trainer, checkpoints, val


def _check_out(args: argparse.Namespace, state_path: Path) -> None:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    if not args.resume:
        if args.out.exists() and any(args.out.iterdir()):
            raise ValueError(f"{args.out} is not empty: pass --resume to continue that run, or choose a new --out")
        return
    if not state_path.is_file():
        raise ValueError(f"--resume: nothing to resume in {args.out} (no {STATE_FILE})")
    given = [f"--{name.replace('_', '-')}" for name in MODEL_DEFAULTS if getattr(args, name) is not None]
    if args.pos_encoding is not None:
        given.append("--pos-encoding")
    if given:
        raise ValueError(f"--resume keeps the model and tokenizer of {args.out}; drop {', '.join(given)}")


def _new_model(args: argparse.Namespace, train: list[Conversation]) -> tuple[GPT, ChatTokenizer]:
    """A tokenizer trained on the training split and a freshly initialised GPT of the asked shape."""
    vocab_size = _setting(args, "vocab_size")
    log.info("training a %d-token tokenizer", vocab_size)
    tokenizer = ChatTokenizer.train((turn for conv in train for turn in conv), vocab_size)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=_setting(args, "context"),
        n_layer=_setting(args, "layers"),
        n_head=_setting(args, "heads"),
        n_embd=_setting(args, "width"),
        dropout=_setting(args, "dropout"),
        pos_encoding=args.pos_encoding or "learned",
    )
    torch.manual_seed(args.seed)
    return GPT(config), tokenizer


def _setting(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name)
    return MODEL_DEFAULTS[name] if value is None else value


def _first_tokens(tokenizer: ChatTokenizer, convs: list[Conversation], max_tokens: int) -> list[Conversation]:
    """The leading conversations holding about max_tokens tokens (at least one conversation)."""
    chosen, total = [], 0
    for conv in convs:
        if chosen and total >= max_tokens:
            break
        chosen.append(conv)
        total += len(conversation_ids(tokenizer, conv))
    return chosen


def _finish(trainer: Trainer, checkpoints: _Checkpoints, val: list[Conversation]) -> list[tuple[str, str]]:
    """Score the best weights on all validation data and record that in the checkpoint's meta."""
    device = trainer.device
    best = load_model(checkpoints.out, str(device))
    log.info("scoring the best weights on %d validation conversations", len(val))
    result = score(best.model, best.tokenizer, val, best.config.block_size, device=device)
    counters = trainer.counters()
    checkpoints.save(best.model, {
        **counters,
        "val_loss": result["loss"],
        "val_perplexity": result["perplexity"],
        "val_bits_per_byte": result["bits_per_byte"],
        "val_tokens": result["tokens"],
        "val_bytes": result["bytes"],
    })
    return [
        ("model", f"{checkpoints.out} ({best.model.num_params():,} parameters)"),
        ("steps", f"{counters['steps']:,}"),
        ("tokens seen", f"{counters['tokens_seen']:,}"),
        ("training time", _clock(counters["training_seconds"])),
        ("val loss", f"{result['loss']:.4f} nats/token"),
        ("val perplexity", f"{result['perplexity']:.2f}"),
        ("val bits/byte", f"{result['bits_per_byte']:.4f}"),
    ]
