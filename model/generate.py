"""Sampling as a chain of small functions: logits → probabilities → token, with a KV cache."""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from model.gpt import GPT, KVCache
from model.tokenizer import ChatTokenizer

SEED_LIMIT = 2**64  # torch.Generator.manual_seed raises beyond 64 bits, inside whatever thread samples


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.1  # 1.0 = off
    max_new_tokens: int = 128
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed per call

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop_strings must not contain the empty string")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


def apply_repetition_penalty(logits: Tensor, ids: Sequence[int], penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already generated: shrink positive logits, grow negative."""
    if penalty == 1.0 or not ids:
        return logits
    seen = torch.tensor(sorted(set(ids)), device=logits.device)
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def top_p_filter(sorted_logits: Tensor, p: float) -> Tensor:
    """Nucleus over logits sorted in descending order: keep the fewest that reach probability p."""
    if p >= 1.0:
        return sorted_logits
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the ones before it already reach p; the most likely always stays
    drop = (probs.cumsum(dim=-1) - probs) >= p
    return sorted_logits.masked_fill(drop, float("-inf"))


def logits_to_probs(logits: Tensor, params: SamplingParams, generated_ids: Sequence[int]) -> Tensor:
    """Next-token probabilities (vocab,) from logits (vocab,); greedy gives a one-hot."""
    logits = apply_repetition_penalty(logits.float(), generated_ids, params.repetition_penalty)
    vocab = logits.size(-1)
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), vocab).float()
    # sort only the top_k candidates (the whole vocabulary when top_k is off)
    k = params.top_k if 0 < params.top_k < vocab else vocab
    values, indices = torch.topk(logits / params.temperature, k)  # (k,), descending
    values = top_p_filter(values, params.top_p)
    return torch.zeros_like(logits).scatter(0, indices, torch.softmax(values, dim=-1))


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """Draw one token id from probs (vocab,)."""
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def prefill(model: GPT, ids: Sequence[int], kv_cache: KVCache | None) -> Tensor:
    """Run ids from position 0 (filling kv_cache if given); logits (vocab,) of the next token."""
    idx = torch.tensor([list(ids)], dtype=torch.long, device=_device(model))  # (1, T)
    logits, _ = model(idx, kv_cache=kv_cache)
    return logits[0, -1]


def decode_one_token(model: GPT, token: int, kv_cache: KVCache, pos: int) -> Tensor:
    """Feed one token at position pos; logits (vocab,) of the token after it."""
    idx = torch.tensor([[token]], dtype=torch.long, device=_device(model))  # (1, 1)
    logits, _ = model(idx, kv_cache=kv_cache, start_pos=pos)
    return logits[0, -1]


@torch.inference_mode()
def generate_tokens(
    model: GPT, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id (not yielded) or max_new_tokens.

    The model should be in eval() mode. A prompt longer than block_size - 1 keeps its newest
    tokens. When the context fills up, it slides: the newest block_size // 2 tokens are
    re-prefilled. use_cache=False recomputes the same context every step (reference and
    benchmark); both paths see identical contexts, so greedy decoding agrees.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    block_size = model.config.block_size
    generator = torch.Generator(device=_device(model))
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    stop_ids = frozenset(params.stop_ids)
    context = list(prompt_ids[-max(1, block_size - 1) :])
    kv_cache = model.new_kv_cache() if use_cache else None
    logits = prefill(model, context, kv_cache)
    generated: list[int] = []
    while len(generated) < params.max_new_tokens:
        token = sample(logits_to_probs(logits, params, generated), generator)
        if token in stop_ids:
            return
        yield token
        generated.append(token)
        if len(generated) == params.max_new_tokens:
            return
        if len(context) == block_size:
            context = (context + [token])[-max(1, block_size // 2) :]
            logits = prefill(model, context, kv_cache)
        elif kv_cache is not None:
            logits = decode_one_token(model, token, kv_cache, len(context))
            context.append(token)
        else:
            context.append(token)
            logits = prefill(model, context, None)


def stream_text(
    model: GPT, tokenizer: ChatTokenizer, prompt_ids: list[int], params: SamplingParams
) -> Iterator[str]:
    """Yield UTF-8-safe text pieces of the reply; stop at a special token, stop id or stop string.

    Any special token ends the reply: eos, and in our chat format also a turn marker, which
    would mean the model has started writing someone else's turn. Text before a stop string
    is yielded, the stop string itself is not. A tail that could be the start of a stop string
    is held back until the next piece settles it.
    """
    params = replace(params, stop_ids=(*params.stop_ids, *sorted(tokenizer.special_ids)))
    decoder = tokenizer.stream_decoder()
    pending = ""
    for token in generate_tokens(model, prompt_ids, params):
        pending += decoder.push(token)
        cut = _find_stop(pending, params.stop_strings)
        if cut is not None:
            if pending[:cut]:
                yield pending[:cut]
            return
        keep = _held_back(pending, params.stop_strings)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += decoder.flush()
    cut = _find_stop(pending, params.stop_strings)
    if pending[:cut]:
        yield pending[:cut]


def _find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _device(model: GPT) -> torch.device:
    return model.transformer.wte.weight.device
