"""The training loop: AdamW over the trainable parameters, warmup + decay, checkpoints.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples on each of the
`world_size` ranks. Data order is a seeded permutation per epoch (`DistributedSampler`'s,
also with one process), and the position in it is checkpointed, so a resumed run sees the
same batches, in the same order, with the same random state as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from .after_step import after_step, save
from .data_order import remaining_windows
from .distributed import DistEnv
from .divergence import diverged
from .labelled_loss import labelled_logits_only
from .options import Task, TrainOptions
from .run import Collate, Run, setup_run
from .run_report import RunReport, report_eval
from .run_state import RunState
from .start import start_or_resume
from .step import train_step


@dataclass
class TrainResult:
    """What a finished run did: steps, wall time (with evals and checkpoints), time in
    training steps alone, tokens trained on (all ranks), eval metrics before and after."""

    steps: int
    seconds: float
    train_seconds: float
    tokens: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    checkpoint: Path | None

    @property
    def tokens_per_s(self) -> float:
        """Training throughput: tokens over the time spent in training steps."""
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


def train(
    model: nn.Module,
    train_data: Dataset,
    eval_data: Dataset | None,
    options: TrainOptions,
    *,
    task: Task,
    collate_fn: Collate,
    env: DistEnv | None = None,
    write_adapter: Callable[[nn.Module, Path], Any] | None = None,
) -> TrainResult:
    """Train the trainable parameters of `model` (e.g. after `lorakit.inject`) on `train_data`.

    `model(**collate_fn(examples))` must return an output with `.loss` and `.logits` (any
    transformers model does). Writes `options.out`/checkpoints and metrics.jsonl (rank 0).
    With `options.resume`, continues from the newest checkpoint there.

    Raises:
        TrainingError: the loss or gradient norm became NaN or inf.
        CheckpointError: the checkpoint to resume from does not fit the model.
    """
    from ..checkpoint import save_adapter

    env, write_adapter = env or DistEnv(), write_adapter or save_adapter
    run = setup_run(model, train_data, eval_data, options, task, collate_fn, env, write_adapter)
    state, report = start_or_resume(run)
    run.wrapped.train()
    try:
        with _labelled_logits(model, task, options):
            _train_steps(run, state, report)
    finally:
        report.progress.close()
    return _finish(run, state, report)


def _train_steps(run: Run, state: RunState, report: RunReport) -> None:
    """The steps left: each one, its divergence check, then logging, evals and saves."""
    for window in remaining_windows(run, state):
        figures = train_step(run, window)
        if figures.diverged:
            raise diverged(state, figures, report)
        state.advance(figures, len(window))
        after_step(run, state, figures, report)


def _labelled_logits(
    model: nn.Module, task: Task, options: TrainOptions
) -> contextlib.AbstractContextManager:
    """For causal-lm, the head and loss on labelled positions only (`labelled_loss`)."""
    if task == "causal-lm" and options.labelled_logits_only:
        return labelled_logits_only(model)
    return contextlib.nullcontext()


def _finish(run: Run, state: RunState, report: RunReport) -> TrainResult:
    """Evaluate the trained model and write the final checkpoint (a resumed run that had no
    step left keeps the one it resumed from)."""
    eval_after = run.eval_metrics()
    report_eval(report, state.step, eval_after, "eval after training:")
    if state.resumed_at is None or state.step > state.resumed_at:
        state.last_checkpoint = save(run, state)
    seconds = time.perf_counter() - state.started_at
    return TrainResult(
        state.step,
        seconds,
        state.train_seconds,
        state.tokens,
        state.eval_before,
        eval_after,
        state.last_checkpoint,
    )
