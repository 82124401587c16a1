"""One request inside the engine: what it asks (`Job`), and its progress (`Sequence`).

The engine hands each sequence's events to the request's `sink` from the decoding thread:
`Piece` for each bit of new text, then one `Finish` (or `Failed`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import Sampling
from .text import Decode, TextTracker


@dataclass(frozen=True)
class Job:
    """A generation request: prompt token ids, adapter (None: the base), limits, decoding."""

    prompt_ids: tuple[int, ...]
    adapter: str | None = None
    max_tokens: int = 16
    sampling: Sampling = field(default_factory=Sampling)
    stops: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finish:
    """The answer is over. reason: "stop" (end of text or a stop string), "length"
    (max_tokens reached) or "cancelled" (the client left)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Failed:
    message: str


Event = Piece | Finish | Failed
Sink = Callable[[Event], None]


class Sequence:
    """A job being generated: its new tokens, its text so far, whether its client left."""

    def __init__(self, job: Job, sink: Sink, decode: Decode, eos_ids: frozenset[int]) -> None:
        self.job = job
        self.sink = sink
        self.ids: list[int] = []
        self.text = TextTracker(decode, job.stops)
        self.eos_ids = frozenset() if job.ignore_eos else eos_ids
        self.generator = job.sampling.generator()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this sequence at its next step (from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def add(self, token: int) -> str | None:
        """Take the next token; returns the finish reason once the answer is over."""
        if token in self.eos_ids:
            return "stop"  # the end-of-text token is not part of the answer
        self.ids.append(token)
        piece, stopped = self.text.update(self.ids)
        if piece:
            self.sink(Piece(piece))
        if stopped:
            return "stop"
        return "length" if len(self.ids) >= self.job.max_tokens else None

    def finish(self, reason: str) -> None:
        """Send what text was held back, then the Finish event."""
        rest = self.text.flush() if reason != "cancelled" else ""
        if rest:
            self.sink(Piece(rest))
        prompt = len(self.job.prompt_ids)
        self.sink(Finish(reason, prompt, len(self.ids), tuple(self.ids)))
