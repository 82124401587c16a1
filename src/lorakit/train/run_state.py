"""Where a training run stands and what it has done so far (`RunState`): its checkpoints save
this, and a resumed run starts from it."""

from __future__ import annotations

import time
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .state import Position

if TYPE_CHECKING:
    from .step import StepFigures


@dataclass
class LogWindow:
    """The steps since the last logged one: when the window began, its tokens and losses."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    losses: list[float] = field(default_factory=list)


@dataclass
class RunState:
    """Steps done, the epoch and micro-batches done in it, tokens and time in training steps,
    the eval metrics before training and the newest checkpoint. `resumed_at`: the step a
    resumed run started from (None for a fresh run); `elapsed`: the earlier runs' wall time.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    eval_before: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    resumed_at: int | None = None
    elapsed: InitVar[float] = 0.0
    started_at: float = field(init=False)  # perf_counter() at the start, less `elapsed`
    since_log: LogWindow = field(init=False)

    def __post_init__(self, elapsed: float) -> None:
        self.started_at = time.perf_counter() - elapsed
        self.since_log = LogWindow()

    def position(self) -> Position:
        return Position(self.step, self.epoch, self.batch)

    def advance(self, figures: StepFigures, micro_batches: int) -> None:
        """Count one optimizer step over `micro_batches` micro-batches."""
        self.tokens += figures.tokens
        self.since_log.tokens += figures.tokens
        self.step += 1
        self.batch += micro_batches
        self.train_seconds += figures.seconds
        self.since_log.losses.append(figures.loss)
