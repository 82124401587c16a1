"""Continuous batching without threads: sequences join between steps and leave when done.

Each decoding step is one forward of the model through `lorakit.routing`, one row per
running sequence with that sequence's adapter (or the base). A joining sequence is first
prefilled alone (its prompt in one forward with its adapter active, its own cache: see
`single.py`), then decodes in the shared batch; rows have their own positions in a
left-padded cache (`BatchCache`).

The routing context of the decoding steps stays open while the rows' adapters stay the same:
entering one walks every layer and re-checks each layer's stacked factors, which costs as
much as a few percent of a step. `release` closes it; the engine calls it before adapters
change.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ..routing import routing
from .kv import BatchCache
from .sampling import sample
from .sequence import Sequence
from .single import single_adapter

Ended = Callable[[Sequence, str], None]  # told when a sequence ends, with its finish reason


class Batcher:
    """The running batch of one model; `end` is called for each sequence that finishes."""

    def __init__(self, model: nn.Module, end: Ended) -> None:
        self.model = model
        self.end = end
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []
        self.cache = BatchCache()
        self.pending: list[int] = []  # each row's last chosen token, not yet in the cache
        # transformers 5.x renamed the forward's past_key_values to cache
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self._routed: tuple[tuple[str | None, ...], ExitStack] | None = None

    def release(self) -> None:
        """Close the open routing context, if any (before the model's adapters change)."""
        if self._routed is not None:
            self._routed[1].close()
            self._routed = None

    def reset(self) -> list[Sequence]:
        """Forget the batch (after a failed step); returns the sequences that were in it."""
        self.release()
        rows, self.rows, self.pending, self.cache = self.rows, [], [], BatchCache()
        return rows

    def join(self, seq: Sequence) -> None:
        """Prefill `seq` alone and choose its first token; it stays in the batch unless done."""
        if seq.cancelled:
            self.end(seq, "cancelled")
            return
        ids = torch.tensor([seq.job.prompt_ids], device=self.device)
        self.release()
        with single_adapter(self.model, seq.job.adapter):
            out = self._forward(ids)
        token = choose(out.logits[:, -1], [seq])[0]
        reason = seq.add(token)
        if reason:
            self.end(seq, reason)
            return
        self.cache.join(_cache_of(out))
        self.rows.append(seq)
        self.pending.append(token)

    def step(self) -> None:
        """One decoding step for every running sequence (after dropping cancelled ones)."""
        self._keep([i for i, seq in enumerate(self.rows) if not self._left(seq)])
        if not self.rows:
            return
        mask, positions = self.cache.step_inputs()
        tokens = torch.tensor(self.pending, device=self.device).view(-1, 1)
        self._route(tuple(seq.job.adapter for seq in self.rows))
        out = self._forward(tokens, attention_mask=mask, position_ids=positions,
                            **{self.cache_arg: self.cache.cache})  # fmt: skip
        self.cache.stepped(mask)
        self.pending = choose(out.logits[:, -1], self.rows)
        done = {i: seq.add(t) for i, (seq, t) in enumerate(zip(self.rows, self.pending))}
        for i, reason in done.items():
            if reason:
                self.end(self.rows[i], reason)
        self._keep([i for i, reason in done.items() if not reason])

    def _route(self, adapters: tuple[str | None, ...]) -> None:
        """Have row i go through adapters[i], reusing the open context when it matches."""
        if self._routed is not None and self._routed[0] == adapters:
            return
        self.release()
        stack = ExitStack()
        stack.enter_context(routing(self.model, adapters, reuse_stacks=True))
        self._routed = (adapters, stack)

    def _forward(self, ids: Tensor, **inputs: object) -> object:
        """The model's output for `ids` (rows, tokens) under the current routing; only the
        last position's logits are computed."""
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **inputs)

    def _left(self, seq: Sequence) -> bool:
        """Whether `seq`'s client left (then it ends now); read once: it may flip any time."""
        cancelled = seq.cancelled
        if cancelled:
            self.end(seq, "cancelled")
        return cancelled

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.rows):
            return
        self.cache.keep(rows)
        if not rows:
            self.release()  # idle: the layers go back to their own adapters
        self.rows = [self.rows[i] for i in rows]
        self.pending = [self.pending[i] for i in rows]


def _cache_of(out: object) -> object:
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def choose(logits: Tensor, seqs: list[Sequence]) -> list[int]:
    """The next token of each row: argmax for greedy sequences, else a draw from its own
    generator. logits: (rows, vocab)."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        if not seq.job.sampling.greedy:
            tokens[i] = sample(logits[i], seq.job.sampling, seq.generator)
    return tokens
