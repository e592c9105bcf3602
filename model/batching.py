"""Continuous batching: requests join the running batch after their prefill and leave the step they end."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from model.batch_sampling import sample_rows
from model.conversation_cache import CachedTurn, ConversationCache, common_prefix
from model.generate import SamplingParams
from model.gpt import GPT
from model.kv_pool import RowKVCache
from model.reply_text import ReplyText


@dataclass(eq=False, kw_only=True)
class Request:
    """One generation as the caller asked for it; the batcher answers through step()'s events."""

    prompt_ids: list[int]
    params: SamplingParams
    cache_key: str | None = None  # the conversation whose previous turn's keys and values may be reused
    text: ReplyText | None = None  # given: events are text pieces and stop strings apply; None: token ids
    cancelled: bool = False  # may be set from any thread; the request leaves at the next step


# (request, item): item is a token id or text piece, None when the request has ended, or the
# exception that ended it
Event = tuple[Request, int | str | BaseException | None]


@dataclass(frozen=True)
class BatchStats:
    waiting: int  # requests not yet given a batch row
    running: int  # requests prefilling or decoding
    cached_conversations: int
    cached_bytes: int
    prefilled_tokens: int  # since start: prompt tokens run through the model
    reused_tokens: int  # since start: prompt tokens whose keys and values came from the conversation cache
    decoded_tokens: int  # since start: tokens fed by decoding steps
    decode_steps: int


@dataclass(eq=False)
class _Sequence:
    request: Request
    context: list[int]  # the tokens whose keys and values belong in the row, from position 0
    generator: torch.Generator
    stop_ids: frozenset[int]
    done: int = 0  # tokens of context already in the row
    pending: int | None = None  # sampled and given out; enters the row at the next decoding step
    generated: list[int] = field(default_factory=list)
    row: int = -1  # batch row, -1 while it has none


class Batcher:
    """Runs many requests through one model, one step at a time. Not thread-safe: one thread owns it.

    Rows 0..D-1 of the KV pool hold the D decoding sequences (self.decoding[i] in row i); row D
    holds the one being prefilled, if any. A step prefills up to prefill_chunk prompt tokens,
    oldest request first (a finished prompt joins the decoding rows), then feeds every decoding
    row its pending token in one batched forward pass and samples the next. A sequence that
    ends leaves at once and the last row moves into its place, so the rows stay contiguous.
    Greedy decoding gives the same tokens as generate.generate_tokens, whatever else runs.
    The pool, and the conversation cache's copies of its rows, hold kv_dtype (default: the
    weights' dtype); a narrower one is widened where attention reads it.
    """

    def __init__(self, model: GPT, *, max_batch: int, cache_bytes: int, prefill_chunk: int,
                 kv_dtype: torch.dtype | None = None) -> None:
        if max_batch < 1 or prefill_chunk < 1 or cache_bytes < 0:
            raise ValueError("max_batch and prefill_chunk must be >= 1, cache_bytes >= 0")
        weight = model.transformer.wte.weight
        self.model = model
        self.device = weight.device
        self.block_size = model.config.block_size
        self.prefill_chunk = prefill_chunk
        self.kv = RowKVCache(model.config, max_batch, self.device, kv_dtype or weight.dtype)
        # tokens each row has generated, for the repetition penalty: (max_batch, vocab)
        self.seen = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.bool, device=self.device)
        self.conversations = ConversationCache(cache_bytes, max_spares=max_batch)  # a turn ends per row at most
        self.waiting: deque[_Sequence] = deque()
        self.decoding: list[_Sequence] = []
        self.prefilling: _Sequence | None = None
        self._events: list[Event] = []
        self._prefilled = self._reused = self._decoded = self._steps = 0

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.decoding and self.prefilling is None

    def stats(self) -> BatchStats:
        return BatchStats(
            waiting=len(self.waiting),
            running=len(self.decoding) + (self.prefilling is not None),
            cached_conversations=len(self.conversations),
            cached_bytes=self.conversations.nbytes,
            prefilled_tokens=self._prefilled,
            reused_tokens=self._reused,
            decoded_tokens=self._decoded,
            decode_steps=self._steps,
        )

    def add(self, request: Request) -> None:
        """Queue a request; it gets a row when one is free. The prompt keeps its newest block_size-1 tokens."""
        params = request.params
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        context = list(request.prompt_ids[-max(1, self.block_size - 1) :])
        if params.max_new_tokens == 0:
            self._events.append((request, None))
            return
        self.waiting.append(_Sequence(request, context, generator, frozenset(params.stop_ids)))

    def step(self) -> list[Event]:
        """Drop cancelled requests, prefill, run one decoding step; the events that came of it."""
        self._drop_cancelled()
        self._prefill()
        if self.decoding:
            self._decode()
        events, self._events = self._events, []
        return events

    def fail_all(self, error: BaseException) -> list[Event]:
        """End every request with error (after a failed decoding step, or at shutdown)."""
        everyone = [*self.decoding, *([self.prefilling] if self.prefilling else []), *self.waiting]
        self.decoding, self.prefilling = [], None
        self.waiting.clear()
        events, self._events = self._events, []
        return events + [(seq.request, error) for seq in everyone]

    def _drop_cancelled(self) -> None:
        for seq in [*self.decoding, *([self.prefilling] if self.prefilling else []), *self.waiting]:
            if seq.request.cancelled:
                if seq.row < 0:
                    self.waiting.remove(seq)
                self._finish(seq)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                if not self.waiting or len(self.decoding) == self.kv.rows:
                    return
                self._admit(self.waiting.popleft())
            seq = self.prefilling
            assert seq is not None
            n = min(budget, len(seq.context) - seq.done)
            ids = torch.tensor([seq.context[seq.done : seq.done + n]], device=self.device)  # (1, n)
            try:
                logits = self.model.forward_last(ids, self.kv.row(seq.row), seq.done)  # (1, vocab)
            except Exception as exc:  # this request's own failure (out of memory, say): the rest go on
                self._finish(seq, exc)
                continue
            seq.done += n
            budget -= n
            self._prefilled += n
            if seq.done == len(seq.context):
                self.prefilling = None
                self.decoding.append(seq)  # its row, len(decoding) before, is the next decoding row
                seen = self.seen[seq.row : seq.row + 1]
                self._accept(seq, sample_rows(logits, seen, [seq.request.params], [seq.generator])[0])

    def _admit(self, seq: _Sequence) -> None:
        """Give seq the row after the decoding ones, with its conversation's cached prefix if any."""
        seq.row = len(self.decoding)
        self.prefilling = seq
        self.seen[seq.row] = False
        if seq.generated:  # back after its window slid: the penalty still knows its tokens
            self.seen[seq.row, torch.tensor(seq.generated, device=self.device)] = True
        key = seq.request.cache_key
        entry = self.conversations.take(key) if key is not None and not seq.generated else None
        if entry is not None:
            # at least the last prompt token is run again: its logits give the first new token
            n = min(common_prefix(entry.ids, seq.context), len(seq.context) - 1)
            if n > 0:
                self.kv.write_row(seq.row, entry.kv, n)
                seq.done = n
                self._reused += n
            self.conversations.release(entry)  # its buffer serves the next turn to end

    def _decode(self) -> None:
        """Feed every decoding row its pending token and sample the next; a failure ends only its own request."""
        seqs = list(self.decoding)
        outcomes: list[int | Exception]
        try:
            outcomes = list(self._next_tokens(seqs, self.kv))
        except Exception:
            # Out of memory for the whole batch, say: run the rows one at a time (less memory at
            # once; the keys and values written so far are written again, the same), so that
            # whatever still fails ends only the request it belongs to.
            outcomes = [self._next_token_alone(seq) for seq in seqs]
        self._steps += 1
        for seq, outcome in zip(seqs, outcomes):
            if isinstance(outcome, int):  # its pending token is in the row now
                assert seq.pending is not None
                seq.context.append(seq.pending)
                seq.done += 1
                seq.pending = None
                self._decoded += 1
        for seq, outcome in zip(seqs, outcomes):
            if isinstance(outcome, int):
                self._accept(seq, outcome)
            else:
                self._finish(seq, outcome)

    def _next_tokens(self, seqs: list[_Sequence], kv: RowKVCache) -> list[int]:
        """One decoding step of seqs, which sit in rows 0.. of kv: the next token of each."""
        tokens = torch.tensor([s.pending for s in seqs], device=self.device)  # (B,)
        pos = torch.tensor([s.done for s in seqs], device=self.device)  # (B,) where each token goes
        logits = self.model.decode_rows(tokens, pos, kv)  # (B, vocab)
        first = seqs[0].row
        seen = self.seen[first : first + len(seqs)]  # (B, vocab)
        return sample_rows(logits, seen, [s.request.params for s in seqs], [s.generator for s in seqs])

    def _next_token_alone(self, seq: _Sequence) -> int | Exception:
        try:
            return self._next_tokens([seq], self.kv.rows_view(seq.row, 1))[0]
        except Exception as exc:
            return exc

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Give out a sampled token, then end seq, slide its window, or keep it for the next step."""
        request = seq.request
        if token in seq.stop_ids:
            self._finish(seq)
            return
        seq.generated.append(token)
        self.seen[seq.row, token] = True
        if request.text is None:
            self._events.append((request, token))
        else:
            piece = request.text.push(token)
            if piece:
                self._events.append((request, piece))
            if request.text.stopped:
                self._finish(seq)
                return
        if len(seq.generated) == request.params.max_new_tokens:
            self._finish(seq)
        elif len(seq.context) == self.block_size:
            # the window is full: go on from its newest half, prefilled again (as generate_tokens)
            seq.context = (seq.context + [token])[-max(1, self.block_size // 2) :]
            seq.done = 0
            self._free_row(seq)
            self.waiting.appendleft(seq)
        else:
            seq.pending = token

    def _finish(self, seq: _Sequence, error: BaseException | None = None) -> None:
        """seq leaves: its keys and values go to the conversation cache, its row to the others."""
        request = seq.request
        if seq.row >= 0:
            if request.cache_key is not None and seq.done > 0 and error is None:
                kv = self.kv.read_row(seq.row, seq.done, self.conversations.buffer)
                self.conversations.put(request.cache_key, CachedTurn(tuple(seq.context[: seq.done]), kv))
            self._free_row(seq)
        if error is not None:
            self._events.append((request, error))
            return
        if request.text is not None:
            rest = request.text.finish()
            if rest:
                self._events.append((request, rest))
        self._events.append((request, None))

    def _free_row(self, seq: _Sequence) -> None:
        if seq is self.prefilling:  # the highest row in use: nothing moves
            self.prefilling = None
        else:
            last = self.decoding.pop()
            if last is not seq:
                self._move(last, seq.row)
                self.decoding[seq.row] = last
            if self.prefilling is not None:  # it sat right after the decoding rows
                self._move(self.prefilling, len(self.decoding))
        seq.row = -1

    def _move(self, seq: _Sequence, row: int) -> None:
        self.kv.move_row(seq.row, row, seq.done)
        self.seen[row] = self.seen[seq.row]
        seq.row = row
