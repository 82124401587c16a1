"""How a training run begins: afresh, or from the newest checkpoint in `out` (`resume`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .distributed import barrier
from .run import Run
from .run_report import RunReport, open_report, report_eval
from .run_state import RunState
from .state import checkpoint_dir, latest_checkpoint, load_checkpoint


def start_or_resume(run: Run) -> tuple[RunState, RunReport]:
    """With `resume`, continue from the newest checkpoint in `out` (if there is one); else
    start afresh. Opens metrics.jsonl and the progress display and says where it starts."""
    checkpoint = latest_checkpoint(run.out) if run.options.resume else None
    return _start(run) if checkpoint is None else _resume(run, checkpoint)


def _start(run: Run) -> tuple[RunState, RunReport]:
    """Remove earlier checkpoints, seed, and evaluate the untrained model."""
    if run.env.is_main:
        shutil.rmtree(checkpoint_dir(run.out), ignore_errors=True)  # a fresh run owns `out`
    barrier(run.env)
    torch.manual_seed(run.options.seed + run.env.rank)  # dropout streams differ per rank
    eval_before = run.eval_metrics()
    report = open_report(run, None)
    report_eval(report, 0, eval_before, "eval before training:")
    return RunState(eval_before=eval_before), report


def _resume(run: Run, checkpoint: Path) -> tuple[RunState, RunReport]:
    """Load the model, optimizer, scheduler and RNG states and the run's totals."""
    position, saved = load_checkpoint(
        checkpoint, run.env, run.base, run.optimizer, run.scheduler, fsdp=run.options.fsdp
    )
    # This run's schedule (e.g. a larger --max-steps), for every parameter group.
    run.scheduler.lr_lambdas = [run.schedule] * len(run.optimizer.param_groups)
    report = open_report(run, position.step)
    report.progress.print(f"resuming from {checkpoint} (step {position.step} of {run.total})")
    if saved["world_size"] != run.env.world_size:
        report.progress.print(
            f"note: the checkpoint was written by {saved['world_size']} process(es), this "
            f"run has {run.env.world_size}: the data after it is sharded differently than an "
            "uninterrupted run's"
        )
    state = RunState(
        position.step,
        position.epoch,
        position.batch,
        tokens=saved["tokens"],
        train_seconds=saved.get("train_seconds", saved["elapsed"]),
        eval_before=saved["eval_before"],
        last_checkpoint=checkpoint,
        resumed_at=position.step,
        elapsed=saved["elapsed"],
    )
    return state, report
