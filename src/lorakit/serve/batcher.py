"""Continuous batching without threads: sequences join between steps and leave when done.

Each step is one forward of the model through `lorakit.routing`, one row per running
sequence with that sequence's adapter (or the base): a joining sequence is first prefilled
alone (its prompt in one forward, its own cache), then decodes in the shared batch; rows
have their own positions in a left-padded cache (`BatchCache`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..routing import routing
from .kv import BatchCache
from .sampling import sample
from .sequence import Sequence

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

    def reset(self) -> list[Sequence]:
        """Forget the batch (after a failed step); returns the sequences that were in it."""
        rows, self.rows, self.pending, self.cache = self.rows, [], [], BatchCache()
        return rows

    def join(self, seq: Sequence) -> None:
        """Prefill `seq` alone and choose its first token; it stays in the batch unless done."""
        if seq.cancelled:
            self.end(seq, "cancelled")
            return
        ids = torch.tensor([seq.job.prompt_ids], device=self.device)
        out = self._forward(ids, [seq.job.adapter])
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
        adapters = [seq.job.adapter for seq in self.rows]
        out = self._forward(tokens, adapters, attention_mask=mask, position_ids=positions,
                            **{self.cache_arg: self.cache.cache})  # fmt: skip
        self.cache.stepped(mask)
        self.pending = choose(out.logits[:, -1], self.rows)
        done = {i: seq.add(t) for i, (seq, t) in enumerate(zip(self.rows, self.pending))}
        for i, reason in done.items():
            if reason:
                self.end(self.rows[i], reason)
        self._keep([i for i, reason in done.items() if not reason])

    def _forward(self, ids: Tensor, adapters: list[str | None], **inputs: object) -> object:
        """The model's output for `ids` (rows, tokens), row i through adapters[i]; only the
        last position's logits are computed."""
        with routing(self.model, adapters, reuse_stacks=True):
            return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **inputs)

    def _left(self, seq: Sequence) -> bool:
        if seq.cancelled:
            self.end(seq, "cancelled")
        return seq.cancelled

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.rows):
            return
        self.cache.keep(rows)
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
