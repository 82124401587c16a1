"""Micro-batches of examples of similar length, so that a batch pads little.

As `transformers`' `group_by_length`: a rank's share of the epoch (already a seeded
permutation) is cut into mega-batches of `MEGA_BATCHES` optimizer steps, each mega-batch is
sorted by length (longest first) and cut into steps, and the steps are then shuffled with a
generator seeded from the run's seed and the epoch. Each rank's share and the number of
micro-batches and steps are those of random batching; only their make-up and order change,
and both follow from the seed, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .options import TrainOptions

MEGA_BATCHES = 50  # optimizer steps per sorted group: long enough to find similar lengths,
# short enough that the order of the epoch stays random
_SEED_STRIDE = 1_000_003  # keeps (seed, epoch) pairs apart in the batch shuffle's seed


def cut(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """`order` cut into micro-batches of `batch_size` (the last one may be shorter)."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


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
    order: Sequence[int], lengths: dict[int, int], batch_size: int, grad_accum: int, seed: int,
    epoch: int,
) -> list[list[int]]:  # fmt: skip
    """`order`'s micro-batches, each of examples of similar length, in a seeded order.

    Grouping is by optimizer step (`batch_size` x `grad_accum` examples, cut into micro-batches
    afterwards), so that accumulating micro-batches trains on the same examples as one
    bigger batch; the one short step stays last, as in random batching."""
    step = batch_size * grad_accum
    steps = []
    for start in range(0, len(order), step * MEGA_BATCHES):
        group = sorted(order[start : start + step * MEGA_BATCHES], key=lambda i: -lengths[i])
        steps += cut(group, step)
    last = steps.pop() if steps and len(steps[-1]) < step else None
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + epoch)
    steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    return [micro for s in steps + ([last] if last else []) for micro in cut(s, batch_size)]


def micro_batches(
    data: Dataset, order: Sequence[int], options: TrainOptions, epoch: int
) -> list[list[int]]:
    """`order` as micro-batches: grouped by length with `batching="by-length"` when the items
    have `input_ids`, else cut as it comes."""
    grouped = options.batching == "by-length"
    lengths = example_lengths(data, order) if grouped else None
    if lengths is None:
        return cut(order, options.batch_size)
    bs, accum = options.batch_size, options.grad_accum
    return length_grouped(order, lengths, bs, accum, options.seed, epoch)
