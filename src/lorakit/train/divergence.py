"""A run whose loss or gradient norm became NaN or inf stops, naming its last good checkpoint."""

from __future__ import annotations

from ..errors import LorakitError
from .run_report import RunReport
from .run_state import RunState
from .step import StepFigures


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN or inf loss); the message names the last good checkpoint."""


def diverged(state: RunState, figures: StepFigures, report: RunReport) -> TrainingError:
    """Log the diverged step; returns the error to raise."""
    step = state.step + 1
    if report.log:
        report.log.write({"step": step, "event": "diverged", "loss": figures.loss})
    where = (
        f"the last good checkpoint is {state.last_checkpoint}"
        if state.last_checkpoint
        else "no checkpoint was written yet"
    )
    return TrainingError(
        f"loss became {figures.loss} (grad norm {figures.grad_norm}) at step {step}; "
        f"training stopped and {where}; try a lower --lr or more --warmup-steps"
    )
