"""Sampling for a batch of sequences at once, each row with its own settings and random generator.

The batched form of generate.logits_to_probs → sample: the repetition penalty works on a
(B, vocab) mask of tokens each row has generated; rows that share temperature, top-k and
top-p are filtered together; each row draws from its own torch.Generator, so what one
request samples never depends on the others in the batch.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from model.generate import SamplingParams, top_p_filter


def penalize_rows(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """CTRL-style penalty per row on logits (B, V) where seen (B, V): shrink positive, grow negative.

    penalty (B, 1); a penalty of 1 leaves a row exactly as it was.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def candidates(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """Probabilities (G, k) of each row's top-k tokens after temperature and top-p, and their ids (G, k)."""
    vocab = logits.size(-1)
    k = top_k if 0 < top_k < vocab else vocab
    values, ids = torch.topk(logits / temperature, k)  # (G, k), descending
    return torch.softmax(top_p_filter(values, top_p), dim=-1), ids


def sample_rows(
    logits: Tensor, seen: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token id per row of logits (B, V): greedy rows take the argmax, the others sample."""
    logits = logits.float()
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([[p.repetition_penalty] for p in params], device=logits.device)  # (B, 1)
        logits = penalize_rows(logits, seen, penalty)
    tokens = logits.argmax(dim=-1)  # (B,); sampled rows are overwritten below
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, p in enumerate(params):
        if p.temperature > 0:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    for (temperature, top_k, top_p), rows in groups.items():
        index = torch.tensor(rows, device=logits.device)  # (G,)
        probs, ids = candidates(logits[index], temperature, top_k, top_p)  # (G, k)
        picks = torch.cat(
            [torch.multinomial(probs[g], 1, generator=generators[row]) for g, row in enumerate(rows)]
        )  # (G,), each from its own row's generator
        tokens[index] = ids.gather(1, picks.unsqueeze(1)).squeeze(1)
    return tokens.tolist()
