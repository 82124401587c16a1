"""Pure LoRA math: the low-rank product, the delta weight, merge and unmerge.

Shapes follow PEFT's: A is (r, in, *kernel), B is (out, r, *ones); s is the scale. The fused
fast path lives in `lorakit.fused`, its CPU dropout masks in `lorakit.dropout_masks`; their
public names are re-exported here, where they used to live.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dropout_masks import dropout_keep, dropout_mask
from .fused import autocast_dtype, fused_lora_linear, merge_pays

__all__ = [
    "autocast_dtype",
    "delta_weight",
    "dropout_keep",
    "dropout_mask",
    "fused_lora_linear",
    "linear_delta",
    "merge_pays",
    "merged_weight",
    "ungrouped_B",
]


def linear_delta(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * B (A x) for x (..., in) -> (..., out)."""
    return (x @ A.t()) @ B.t() * scale


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * B A, the dense update of a weight (out, in, *kernel).

    A: (r, in, *kernel), B: (out, r, *ones); for a Linear this is just s * B @ A. A grouped
    B (out, r / groups, *ones) (PEFT's LoRA on a conv with groups > 1) is expanded first
    (`ungrouped_B`): the update is then that of an ungrouped conv, (out, in, *kernel).
    """
    rank = A.shape[0]
    dense = ungrouped_B(B, rank).reshape(B.shape[0], rank) @ A.reshape(rank, -1)
    return (dense * scale).reshape(B.shape[0], *A.shape[1:])


def merged_weight(weight: Tensor, delta: Tensor, sign: int = 1) -> Tensor:
    """weight + sign * delta, computed in the wider of the two dtypes, cast back to weight's."""
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + sign * delta.to(wide)).to(weight.dtype)


def ungrouped_B(B: Tensor, rank: int) -> Tensor:
    """B (out, r / g, *ones) of a grouped pointwise conv as the equivalent dense (out, r, *ones):
    output channel o of group k = o // (out / g) reads the k-th slice of r / g rank channels,
    so its row is zero outside that slice (block diagonal). B itself when not grouped."""
    per_group = B.shape[1]
    if per_group == rank:
        return B
    groups = rank // per_group
    out = B.shape[0]
    blocks = B.reshape(groups, out // groups, per_group, *B.shape[2:])
    dense = B.new_zeros(groups, out // groups, groups, per_group, *B.shape[2:])
    for k in range(groups):  # groups is small (a conv's channel groups)
        dense[k, :, k] = blocks[k]
    return dense.reshape(out, rank, *B.shape[2:])
