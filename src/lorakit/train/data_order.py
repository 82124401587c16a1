"""The order a run sees its data in: a seeded permutation per epoch (`DistributedSampler`'s,
also with one process), cut into micro-batches (of similar lengths with `batching="by-length"`,
see `length_groups`) and grouped into optimizer steps."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler

from .distributed import DistEnv
from .length_groups import micro_batches
from .options import TrainOptions
from .run import Run
from .run_state import RunState

Window = list[list[int]]  # one optimizer step: its micro-batches, each a list of indices


def windows(
    data: Dataset, options: TrainOptions, env: DistEnv, epoch: int, skip: int
) -> Iterator[Window]:
    """This rank's micro-batches (lists of indices) of `epoch`, grouped per optimizer step,
    starting after the first `skip` micro-batches."""
    sampler = DistributedSampler(
        data, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=options.seed
    )
    sampler.set_epoch(epoch)
    micro = micro_batches(data, list(sampler), options, epoch)
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
