"""The order a run sees its data in: a seeded permutation per epoch (`DistributedSampler`'s,
also with one process), dealt out to the ranks as `DistributedSampler` deals it, cut into
micro-batches and grouped into optimizer steps. With `batching="by-length"` (and "packed") the
permutation is first rearranged into steps of examples of similar length (`length_groups`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

from .distributed import DistEnv
from .length_groups import cut, grouped_order
from .options import TrainOptions
from .run import Run
from .run_state import RunState

Window = list[list[int]]  # one optimizer step: its micro-batches, each a list of indices


def _permutation(data: Dataset, options: TrainOptions, epoch: int) -> list[int]:
    """`epoch`'s seeded permutation of the data, `DistributedSampler`'s (seed + epoch)."""
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=options.seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def _deal(order: list[int], world_size: int, rank: int) -> list[int]:
    """Rank `rank`'s share of `order`, dealt as `DistributedSampler` deals its permutation:
    padded to a multiple of `world_size` by repeating from the start, then every
    `world_size`-th index. The shares are disjoint but for the padding."""
    if not order:
        return []
    total = math.ceil(len(order) / world_size) * world_size
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[rank:total:world_size]


def micro_batches(data: Dataset, options: TrainOptions, env: DistEnv, epoch: int) -> Window:
    """This rank's micro-batches of `epoch`, in order. With `batching="by-length"` or
    "packed" (whose rows fill best with examples of similar length) the permutation is first
    rearranged into optimizer steps (all ranks' micro-batches) of examples of similar length,
    so a step holds the same examples with any world size."""
    order = _permutation(data, options, epoch)
    if options.batching in ("by-length", "packed"):
        step = options.batch_size * options.grad_accum * env.world_size
        order = grouped_order(data, order, step, options.seed, epoch) or order
    return cut(_deal(order, env.world_size, env.rank), options.batch_size)


def windows(
    data: Dataset, options: TrainOptions, env: DistEnv, epoch: int, skip: int
) -> Iterator[Window]:
    """This rank's micro-batches (lists of indices) of `epoch`, grouped per optimizer step,
    starting after the first `skip` micro-batches."""
    micro = micro_batches(data, options, env, epoch)
    for start in range(skip, len(micro), options.grad_accum):
        yield micro[start : start + options.grad_accum]


def remaining_windows(run: Run, state: RunState) -> Iterator[Window]:
    """The steps still to train, from `state`'s position until `run.total` steps are done;
    at each epoch's end `state` moves on to the next epoch."""
    while state.step < run.total:
        for window in windows(run.train_data, run.options, run.env, state.epoch, state.batch):
            yield window
            if state.step >= run.total:
                return
        state.epoch, state.batch = state.epoch + 1, 0
