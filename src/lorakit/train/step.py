"""One optimizer step: forward and backward over each micro-batch of a window, gradient
clipping, one all-reduce of the step's figures, and the update unless the loss diverged."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import all_sum
from .packing import model_inputs
from .precision import autocast
from .run import Run


@dataclass(frozen=True)
class StepFigures:
    """What one step did: mean loss of its micro-batches (this rank), gradient norm before
    clipping, tokens (all ranks), lr after the step, seconds taken, and whether any rank saw
    a NaN or inf loss or the norm was not finite (then nothing was updated)."""

    loss: float
    grad_norm: float
    tokens: int
    lr: float
    seconds: float
    diverged: bool


def train_step(run: Run, window: list[list[int]]) -> StepFigures:
    """One optimizer step over `window`'s micro-batches (lists of `run.train_data` indices)."""
    started = time.perf_counter()
    loss, bad, tokens = _forward_backward(run, window)
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.options.max_grad_norm or float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # One all-reduce per step: did any rank see NaN/inf, and how many tokens in all.
    bad_ranks, all_tokens = all_sum(run.env, [float(bad), float(tokens)])
    diverged = bad_ranks > 0 or not math.isfinite(norm)
    if not diverged:
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    seconds = time.perf_counter() - started
    return StepFigures(loss, norm, int(all_tokens), lr, seconds, diverged)


def _forward_backward(run: Run, window: list[list[int]]) -> tuple[float, bool, int]:
    """Gradients of the window's mean loss, summed over its micro-batches: (that mean loss,
    whether a micro-batch's loss was NaN or inf, real tokens seen)."""
    loss_sum, bad, tokens = 0.0, False, 0
    for i, rows in enumerate(window):
        batch = run.train_collate([run.train_data[j] for j in rows])
        inputs, real_tokens = model_inputs(batch, run.env.device)
        with _no_sync(run.wrapped, sync=i == len(window) - 1):
            with autocast(run.options.precision, run.env.device):
                loss = run.wrapped(**inputs).loss
            (loss / len(window)).backward()
        value = loss.item()
        bad = bad or not math.isfinite(value)
        loss_sum += value / len(window)
        tokens += real_tokens
    return loss_sum, bad, tokens


@contextlib.contextmanager
def _no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on all but the last
    micro-batch of a step: gradients add up locally and are synchronised once."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(sync)
        yield
    elif sync or not hasattr(model, "no_sync"):
        yield
    else:
        with model.no_sync():
            yield
