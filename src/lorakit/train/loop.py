"""The training loop: AdamW over the trainable parameters, warmup + decay, checkpoints.

One optimizer step = `grad_accum` micro-batches of `batch_size` examples on each of the
`world_size` ranks. Data order is a seeded permutation per epoch (`DistributedSampler`'s,
also with one process), and the position in it is checkpointed, so a resumed run sees the
same batches, in the same order, with the same random state as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from ..errors import LorakitError
from .distributed import DistEnv, all_sum, barrier, unwrap, wrap_model
from .evaluate import evaluate
from .options import Task, TrainOptions
from .precision import autocast
from .report import MetricsLog, Progress
from .state import Position, checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingError(LorakitError, RuntimeError):
    """Training cannot go on (a NaN or inf loss); the message names the last good checkpoint."""


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


def steps_per_epoch(n_examples: int, options: TrainOptions, world_size: int) -> int:
    """Optimizer steps in one pass over the data (the last one may use fewer micro-batches)."""
    per_rank = math.ceil(n_examples / world_size)
    micro = math.ceil(per_rank / options.batch_size)
    return math.ceil(micro / options.grad_accum)


def total_steps(n_examples: int, options: TrainOptions, world_size: int) -> int:
    return options.max_steps or options.epochs * steps_per_epoch(n_examples, options, world_size)


def _windows(
    data: Dataset, options: TrainOptions, env: DistEnv, epoch: int, skip: int
) -> Iterator[list[list[int]]]:
    """This rank's micro-batches (lists of indices) of `epoch`, grouped per optimizer step,
    starting after the first `skip` micro-batches."""
    sampler = DistributedSampler(
        data, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=options.seed
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    micro = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    for start in range(skip, len(micro), options.grad_accum):
        yield micro[start : start + options.grad_accum]


def train(
    model: nn.Module,
    train_data: Dataset,
    eval_data: Dataset | None,
    options: TrainOptions,
    *,
    task: Task,
    collate_fn: Callable[[Sequence[Any]], dict[str, torch.Tensor]],
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

    env = env or DistEnv()
    write_adapter = write_adapter or save_adapter
    if options.threads:
        torch.set_num_threads(options.threads)
    out = Path(options.out)
    base = model
    wrapped = wrap_model(model, env, fsdp=options.fsdp)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    total = total_steps(len(train_data), options, env.world_size)
    schedule = WarmupDecay(min(options.warmup_steps, total), total, options.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    def run_eval() -> dict[str, float]:
        if eval_data is None or len(eval_data) == 0:
            return {}
        target = base if options.fsdp else unwrap(wrapped)
        with autocast(options.precision, env.device):
            return evaluate(target, eval_data, task, collate_fn, env, options.eval_batch_size)

    resume_from = latest_checkpoint(out) if options.resume else None
    if resume_from is not None:
        position, state = load_checkpoint(
            resume_from, env, base, optimizer, scheduler, fsdp=options.fsdp
        )
        scheduler.lr_lambdas = [schedule]  # this run's schedule (e.g. a larger --max-steps)
        eval_before, elapsed, tokens = state["eval_before"], state["elapsed"], state["tokens"]
        train_seconds = state.get("train_seconds", elapsed)
    else:
        if env.is_main:
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)  # a fresh run owns `out`
        barrier(env)
        torch.manual_seed(options.seed + env.rank)  # dropout streams differ per rank
        position, elapsed, tokens, train_seconds = Position(), 0.0, 0, 0.0
        eval_before = run_eval()
    resume_step = position.step if resume_from is not None else None  # fresh: start empty
    log = MetricsLog(out, resume_step) if env.is_main else None
    progress = Progress(total, position.step, options.progress if env.is_main else "none")
    if resume_from is not None:
        progress.print(f"resuming from {resume_from} (step {position.step} of {total})")
        if state["world_size"] != env.world_size:
            progress.print(
                f"note: the checkpoint was written by {state['world_size']} process(es), this "
                f"run has {env.world_size}: the data after it is sharded differently than an "
                "uninterrupted run's"
            )
    elif eval_before:
        progress.print(f"eval before training: {_fmt(eval_before)}")
        if log:
            log.write({"step": 0, "eval": eval_before})

    step, epoch, batch = position.step, position.epoch, position.batch
    last_ckpt = resume_from
    t_start = time.perf_counter() - elapsed
    t_log, tokens_log, losses = time.perf_counter(), 0, []

    def checkpoint() -> Path:
        extra = {
            "eval_before": eval_before,
            "elapsed": time.perf_counter() - t_start,
            "train_seconds": train_seconds,
            "tokens": tokens,
            "task": task,
        }
        return save_checkpoint(
            out,
            env,
            Position(step, epoch, batch),
            base,
            optimizer,
            scheduler,
            extra,
            lambda folder: write_adapter(base, folder),
            keep=options.keep_checkpoints,
            fsdp=options.fsdp,
        )

    wrapped.train()
    try:
        while step < total:
            for window in _windows(train_data, options, env, epoch, batch):
                t_step = time.perf_counter()
                window_loss, bad, step_tokens = 0.0, False, 0
                for i, rows in enumerate(window):
                    inputs = {
                        k: v.to(env.device)
                        for k, v in collate_fn([train_data[j] for j in rows]).items()
                    }
                    sync = i == len(window) - 1
                    with _no_sync(wrapped, sync):
                        with autocast(options.precision, env.device):
                            loss = wrapped(**inputs).loss
                        (loss / len(window)).backward()
                    value = loss.item()
                    bad = bad or not math.isfinite(value)
                    window_loss += value / len(window)
                    step_tokens += _count_tokens(inputs)
                norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm or float("inf"))
                norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                # One all-reduce per step: did any rank see NaN/inf, and how many tokens in all.
                bad_ranks, step_tokens = all_sum(env, [float(bad), float(step_tokens)])
                tokens += int(step_tokens)
                tokens_log += int(step_tokens)
                if bad_ranks > 0 or not math.isfinite(norm):
                    if log:
                        log.write({"step": step + 1, "event": "diverged", "loss": window_loss})
                    where = (
                        f"the last good checkpoint is {last_ckpt}"
                        if last_ckpt
                        else ("no checkpoint was written yet")
                    )
                    raise TrainingError(
                        f"loss became {window_loss} (grad norm {norm}) at step {step + 1}; "
                        f"training stopped and {where}; try a lower --lr or more --warmup-steps"
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch += len(window)
                train_seconds += time.perf_counter() - t_step
                losses.append(window_loss)
                lr = scheduler.get_last_lr()[0]
                now = time.perf_counter()
                tok_s = tokens_log / max(now - t_log, 1e-9)
                progress.update(step, window_loss, tok_s, lr)
                if options.log_every and (step % options.log_every == 0 or step == total):
                    mean = sum(losses) / len(losses)
                    if log:
                        log.write(
                            {
                                "step": step,
                                "epoch": epoch,
                                "loss": mean,
                                "lr": lr,
                                "grad_norm": norm,
                                "tokens_per_s": tok_s,
                                "time": now - t_start,
                            }
                        )
                    progress.log_step(step, mean, tok_s, lr)
                    t_log, tokens_log, losses = now, 0, []
                if options.eval_every and step % options.eval_every == 0 and step < total:
                    metrics = run_eval()
                    if metrics:
                        progress.print(f"step {step}: eval {_fmt(metrics)}")
                        if log:
                            log.write({"step": step, "eval": metrics})
                if options.save_every and step % options.save_every == 0 and step < total:
                    last_ckpt = checkpoint()
                if step >= total:
                    break
            else:
                epoch, batch = epoch + 1, 0
    finally:
        progress.close()
    eval_after = run_eval()
    if eval_after and log:
        log.write({"step": step, "eval": eval_after})
    if eval_after:
        progress.print(f"eval after training: {_fmt(eval_after)}")
    if resume_from is None or step > position.step:
        last_ckpt = checkpoint()  # (a resumed run that had nothing left keeps its checkpoint)
    seconds = time.perf_counter() - t_start
    return TrainResult(step, seconds, train_seconds, tokens, eval_before, eval_after, last_ckpt)


def _count_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) tokens in a batch: the attention mask's ones, else every input id."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else inputs["input_ids"].numel()


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


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
