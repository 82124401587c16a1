"""The work after each optimizer step: progress and metrics lines, then an evaluation and a
checkpoint when they are due."""

from __future__ import annotations

import time
from pathlib import Path

from .run import Run
from .run_report import RunReport, report_eval
from .run_state import LogWindow, RunState
from .state import save_checkpoint
from .step import StepFigures


def after_step(run: Run, state: RunState, figures: StepFigures, report: RunReport) -> None:
    """Report the step; evaluate every `eval_every` and save every `save_every` steps (the
    last step is left to the end of the run)."""
    report_step(run, state, figures, report)
    if _due(run.options.eval_every, state.step, run.total):
        report_eval(report, state.step, run.eval_metrics(), f"step {state.step}: eval")
    if _due(run.options.save_every, state.step, run.total):
        state.last_checkpoint = save(run, state)


def report_step(run: Run, state: RunState, figures: StepFigures, report: RunReport) -> None:
    """Move the progress bar; every `log_every` steps and at the last, log the mean loss and
    the throughput since the last logged step."""
    step, since = state.step, state.since_log
    now = time.perf_counter()
    tokens_per_s = since.tokens / max(now - since.started, 1e-9)
    report.progress.update(step, figures.loss, tokens_per_s, figures.lr)
    every = run.options.log_every
    if not every or (step % every != 0 and step != run.total):
        return
    mean = sum(since.losses) / len(since.losses)
    if report.log:
        report.log.write(
            {
                "step": step,
                "epoch": state.epoch,
                "loss": mean,
                "lr": figures.lr,
                "grad_norm": figures.grad_norm,
                "tokens_per_s": tokens_per_s,
                "time": now - state.started_at,
            }
        )
    report.progress.log_step(step, mean, tokens_per_s, figures.lr)
    state.since_log = LogWindow(started=now)


def save(run: Run, state: RunState) -> Path:
    """Checkpoint the run where it stands (collective: every rank calls it)."""
    extra = {
        "eval_before": state.eval_before,
        "elapsed": time.perf_counter() - state.started_at,
        "train_seconds": state.train_seconds,
        "tokens": state.tokens,
        "task": run.task,
    }
    return save_checkpoint(
        run.out,
        run.env,
        state.position(),
        run.base,
        run.optimizer,
        run.scheduler,
        extra,
        lambda folder: run.write_adapter(run.base, folder),
        keep=run.options.keep_checkpoints,
        fsdp=run.options.fsdp,
    )


def _due(every: int, step: int, total: int) -> bool:
    """Every `every` steps (0: never), but not at the last step."""
    return bool(every) and step % every == 0 and step < total
