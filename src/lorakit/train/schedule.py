"""How long a run is and its learning rate at each step: warmup, then decay (or flat)."""

from __future__ import annotations

import math

from .options import TrainOptions


class WarmupDecay:
    """lr factor at step t: (t + 1) / warmup while warming up, then linear/cosine to 0, or flat.

    A class rather than a lambda so LambdaLR's state_dict and pickling keep working.
    """

    def __init__(self, warmup: int, total: int, schedule: str) -> None:
        self.warmup, self.total, self.schedule = warmup, total, schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)


def steps_per_epoch(n_examples: int, options: TrainOptions, world_size: int) -> int:
    """Optimizer steps in one pass over the data (the last one may use fewer micro-batches)."""
    per_rank = math.ceil(n_examples / world_size)
    micro = math.ceil(per_rank / options.batch_size)
    return math.ceil(micro / options.grad_accum)


def total_steps(n_examples: int, options: TrainOptions, world_size: int) -> int:
    """Optimizer steps in the whole run: `max_steps`, else `epochs` passes over the data."""
    return options.max_steps or options.epochs * steps_per_epoch(n_examples, options, world_size)
