"""Batches of examples of similar length, so that a batch pads little.

As `transformers`' `group_by_length`: the epoch's seeded permutation is cut into mega-batches
of `MEGA_BATCHES` optimizer steps, each mega-batch is sorted by length (longest first) and cut
into steps, and the steps are then shuffled with a generator seeded from the run's seed and
the epoch (the one short step stays last, as in random batching). The steps are the global
ones (all ranks' micro-batches of one optimizer step), so that a run trains on the same
examples per step with any number of processes or micro-batches per step, and the order
follows from the seed, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

MEGA_BATCHES = 50  # optimizer steps per sorted group: long enough to find similar lengths,
# short enough that the order of the epoch stays random
_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart in the step shuffle's seed


def cut(order: Sequence[int], size: int) -> list[list[int]]:
    """`order` cut into consecutive pieces of `size` (the last one may be shorter)."""
    return [list(order[i : i + size]) for i in range(0, len(order), size)]


def example_lengths(data: Dataset, indices: Sequence[int]) -> dict[int, int] | None:
    """Tokens of each `data[i]` (its `input_ids`), or None when the items carry no
    `input_ids` (data of the Python API in another shape: it is batched at random)."""
    lengths = {}
    for i in indices:
        item = data[i]
        if not isinstance(item, dict) or "input_ids" not in item:
            return None
        lengths[i] = len(item["input_ids"])
    return lengths


def length_grouped(
    order: Sequence[int], lengths: dict[int, int], step: int, seed: int, epoch: int
) -> list[int]:
    """`order` rearranged so that each consecutive `step` indices (one optimizer step) are
    of similar length, the steps in a seeded order and the short one last."""
    steps = []
    for start in range(0, len(order), step * MEGA_BATCHES):
        group = sorted(order[start : start + step * MEGA_BATCHES], key=lambda i: -lengths[i])
        steps += cut(group, step)
    last = steps.pop() if steps and len(steps[-1]) < step else []
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    shuffled = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for s in shuffled for i in s] + last


def grouped_order(
    data: Dataset, order: Sequence[int], step: int, seed: int, epoch: int
) -> list[int] | None:
    """`length_grouped` on `data`'s lengths; None when its items carry no `input_ids`."""
    lengths = example_lengths(data, order)
    return None if lengths is None else length_grouped(order, lengths, step, seed, epoch)
