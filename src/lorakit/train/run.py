"""What a training run works with, fixed for its length: the model, optimizer, lr schedule,
data and options (`Run`), and how it is set up from `train`'s arguments."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..optim import param_groups
from .distributed import DistEnv, unwrap, wrap_model
from .evaluate import evaluate
from .options import Task, TrainOptions
from .packing import Collate, training_collate
from .precision import autocast
from .quantize import make_optimizer
from .schedule import WarmupDecay, total_steps


@dataclass(frozen=True, eq=False)
class Run:
    """The fixed parts of one `train` call. `base` is the caller's model; `wrapped` is what
    trains (DDP or FSDP around `base`, or `base` itself); `total` is the run's step count;
    `train_collate` batches training examples (`collate_fn`, or packed: `train.packing`),
    `collate_fn` the eval examples."""

    options: TrainOptions
    env: DistEnv
    task: Task
    out: Path
    base: nn.Module
    wrapped: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: WarmupDecay
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int
    train_data: Dataset
    eval_data: Dataset | None
    collate_fn: Collate
    train_collate: Collate
    write_adapter: Callable[[nn.Module, Path], Any]

    def eval_metrics(self) -> dict[str, float]:
        """`evaluate` on the eval data as the model is now; {} when there is none."""
        if self.eval_data is None or len(self.eval_data) == 0:
            return {}
        target = self.base if self.options.fsdp else unwrap(self.wrapped)
        data, batch_size = self.eval_data, self.options.eval_batch_size
        with autocast(self.options.precision, self.env.device):
            return evaluate(target, data, self.task, self.collate_fn, self.env, batch_size)


def setup_run(
    model: nn.Module,
    train_data: Dataset,
    eval_data: Dataset | None,
    options: TrainOptions,
    task: Task,
    collate_fn: Collate,
    env: DistEnv,
    write_adapter: Callable[[nn.Module, Path], Any],
) -> Run:
    """Wrap `model` for `env` and give its trainable parameters AdamW (`options.optim`'s) and the
    lr schedule.

    Raises:
        ConfigError: `options.batching` is "packed" for a model or task that cannot pack.
    """
    train_collate = training_collate(collate_fn, options, task, model)
    if options.threads:
        torch.set_num_threads(options.threads)
    wrapped = wrap_model(model, env, fsdp=options.fsdp)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    groups = param_groups(wrapped, options.lr, options.loraplus_ratio, options.weight_decay)
    optimizer = make_optimizer(groups, options.optim, options.lr)
    total = total_steps(len(train_data), options, env.world_size)
    schedule = WarmupDecay(min(options.warmup_steps, total), total, options.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Run(
        options=options,
        env=env,
        task=task,
        out=Path(options.out),
        base=model,
        wrapped=wrapped,
        params=params,
        optimizer=optimizer,
        schedule=schedule,
        scheduler=scheduler,
        total=total,
        train_data=train_data,
        eval_data=eval_data,
        collate_fn=collate_fn,
        train_collate=train_collate,
        write_adapter=write_adapter,
    )
