"""Packing: a micro-batch's causal-LM examples laid end to end in a few rows, not one row each.

The micro-batches are grouped by length first (`data_order`), so the rows come out nearly full.

Each row holds whole examples (first-fit decreasing into rows of `max_length` tokens), with
position ids restarting at 0 for each example and no attention mask: `transformers` then
reads the example boundaries from the position ids and lets each token attend only to the
earlier tokens of its own example (`masking_utils.find_packed_sequence_indices`, for eager,
sdpa and flash attention alike). That needs the KV cache off (`use_cache=False`), which
`model_inputs` passes. The first label of each example is -100, so no token is trained to
predict the next example; the loss, a mean over the labelled tokens of the micro-batch, is
the unpacked batch's. Only training batches are packed; evaluation keeps one row per example.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .options import Task, TrainOptions
from .tokenization import IGNORE_INDEX

REAL_TOKENS = "real_tokens"  # a packed batch's count of non-pad tokens (not a model input)
Collate = Callable[[Sequence[Any]], dict[str, torch.Tensor]]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the positions in `lengths` of each row's examples, longest
    first, so that no row holds more than `capacity` tokens (a longer example gets its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def _row(examples: Sequence[dict[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """One packed row's input ids, labels (-100 on each example's first token) and
    position ids (from 0 for each example)."""
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += [IGNORE_INDEX, *ex["labels"][1:]]
        positions += range(len(ex["input_ids"]))
    return ids, labels, positions


def pack(
    batch: Sequence[dict[str, Any]], pad_token_id: int, max_length: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """`batch` packed into rows of at most `max_length` tokens, right-padded to the longest
    row (or `pad_to`): input_ids, labels, position_ids and the count of real tokens. The
    padding continues the position ids from 0 as an example of its own, unlabelled."""
    lengths = [len(ex["input_ids"]) for ex in batch]
    rows = [_row([batch[i] for i in row]) for row in pack_rows(lengths, max_length)]
    width = max(pad_to or 0, *(len(ids) for ids, _, _ in rows))
    out = {
        "input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(len(rows), 1),
    }
    for r, (ids, labels, positions) in enumerate(rows):
        n = len(ids)
        out["input_ids"][r, :n] = torch.tensor(ids)
        out["labels"][r, :n] = torch.tensor(labels)
        out["position_ids"][r, :n] = torch.tensor(positions)
        out["position_ids"][r, n:] = torch.arange(width - n)
    out[REAL_TOKENS] = torch.tensor(sum(lengths))
    return out


class PackedCollator:
    """Picklable collate function of packed training batches (see `pack`)."""

    def __init__(self, pad_token_id: int, max_length: int, pad_to: int | None = None) -> None:
        self.pad_token_id, self.max_length, self.pad_to = pad_token_id, max_length, pad_to

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return pack(batch, self.pad_token_id, self.max_length, self.pad_to)


def training_collate(
    collate_fn: Collate, options: TrainOptions, task: Task, model: nn.Module
) -> Collate:
    """The collate function of training batches: `collate_fn`, or with `batching="packed"`
    a `PackedCollator` with its pad id and fixed width (`--padding max-length`).

    Raises:
        ConfigError: packing asked for a task other than causal-lm, or a model whose
            forward takes no `position_ids`.
    """
    if options.batching != "packed":
        return collate_fn
    if task != "causal-lm":
        raise ConfigError(
            f"batching='packed' needs task causal-lm, got {task!r}: a classifier reads one "
            "example per row; use batching='by-length'"
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(
            f"batching='packed' needs a model whose forward takes position_ids; "
            f"{type(model).__name__} does not: use batching='by-length'"
        )
    pad_to = getattr(collate_fn, "pad_to", None)
    return PackedCollator(getattr(collate_fn, "pad_token_id", 0), options.max_length, pad_to)


def model_inputs(batch: dict[str, torch.Tensor], device: Any) -> tuple[dict[str, Any], int]:
    """`batch` on `device` as the model's keywords, and its real (non-pad) tokens: a packed
    batch's count (and no KV cache, or transformers would not split attention by the
    position ids), else the attention mask's ones, else every input id."""
    inputs: dict[str, Any] = {k: v.to(device) for k, v in batch.items() if k != REAL_TOKENS}
    if REAL_TOKENS in batch:
        return {**inputs, "use_cache": False}, int(batch[REAL_TOKENS])
    mask = inputs.get("attention_mask")
    return inputs, int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
