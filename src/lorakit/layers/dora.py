"""DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's `use_dora`): magnitude and direction.

Each output row j of the adapted weight is m_j times the unit row of W + s B A:

    W'_j = m_j / ||W_j + s (B A)_j|| * (W_j + s (B A)_j)

m (PEFT's `lora_magnitude_vector`) starts at the row norms of W (B = 0), so a fresh adapter
is a no-op. The norm is detached, as the paper (section 4.3) and PEFT do: it scales the
output but takes no gradient. With f = m / ||W + s B A|| (one factor per output row), the
forward is PEFT's `DoraLinearLayer.forward`, applied to the running output y of the layer
(base output plus the adapters before this one; b the base bias):

    y <- y + (f - 1) * (y - b) + f * s B A x                    (no dropout, or eval mode)
    y <- y + (f - 1) * W drop(x) + f * s B A drop(x)            (dropout in training mode)

DoRA terms do not commute: adapters apply in active order, and a layer with some adapters
merged computes the merged ones first; merging keeps the active order, and `unmerge` of one
adapter undoes all merged ones (last first) and merges the rest again. The norm is always of
the unmerged base W (PEFT's `_unmerged_base_weight`).

Row norms without forming B A (out x in): expanding the square,

    ||W_j + s (B A)_j||^2 = ||W_j||^2 + 2 s <W_j, (B A)_j> + s^2 ||(B A)_j||^2
                          = ||W_j||^2 + 2 s sum_i B_ji (W A^T)_ji + s^2 sum_i B_ji (B A A^T)_ji

with W A^T (out x r) one GEMM over W and A A^T (r x r); ||W_j||^2 is cached while W does not
change (the cache follows W's identity, storage and in-place version counter, so a merge,
`load_state_dict` or an optimizer step on W recomputes it). Everything is computed in
float32 at least.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MergeError, UnsupportedLayerError
from ..functional import linear_delta
from .lora import LoRA

if TYPE_CHECKING:  # base.py imports this module
    from .base import LoraLayer


def _wide(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of `dtypes` and float32: the dtype row norms are computed in."""
    wide = torch.float32
    for dtype in dtypes:
        wide = torch.promote_types(wide, dtype)
    return wide


def row_norms(
    rows: Tensor, A: Tensor, B: Tensor, scale: float, rows_sq: Tensor | None = None
) -> Tensor:
    """||W_j + s (B A)_j|| for each row j of `rows` (out, in), without forming B A; detached.

    A: (r, in), B: (out, r); rows_sq: ||W_j||^2 (out,) when known (see `DoRA.weight_sq`).
    """
    with torch.no_grad():
        wide = _wide(rows.dtype, A.dtype)
        A2, B2 = A.reshape(A.shape[0], -1).to(wide), B.reshape(B.shape[0], -1).to(wide)
        if rows_sq is None:
            rows_sq = rows.to(wide).square().sum(1)
        # W A^T in W's dtype (no wide copy of W), accumulated by the GEMM in float32
        wat = (rows @ A2.t().to(rows.dtype)).to(wide)  # (out, r)
        cross = (B2 * wat).sum(1)
        ba_sq = ((B2 @ (A2 @ A2.t())) * B2).sum(1)
        squared = rows_sq.to(wide) + (2.0 * scale) * cross + (scale * scale) * ba_sq
        return squared.clamp_min_(0.0).sqrt_()


def grouped_row_norms(rows: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """PEFT's DoRA norms on a conv with groups > 1, detached: of W + s P row by row, with
    P = (B viewed as (out / g, r)) @ (A as (r, in * k)), reshaped to W's (out, in / g * k).

    That P is not the update B A (an ungrouped kernel, see `layers.conv`), but it is what PEFT
    computes (its `_DoraConvNdLayer.get_lora_weight`); lorakit reproduces it so PEFT's grouped
    DoRA adapters give PEFT's outputs. P is formed: grouped convs are small.
    """
    with torch.no_grad():
        wide = _wide(rows.dtype, A.dtype)
        rank = A.shape[0]
        P = B.reshape(-1, rank).to(wide) @ A.reshape(rank, -1).to(wide)
        return (rows.to(wide) + scale * P.reshape(rows.shape)).norm(dim=1)


def magnitude_shape(b_shape: tuple[int, ...]) -> tuple[int, ...]:
    """PEFT's shape of m for B's shape: (out,), or (1, out, 1, ...) for a convolution, so it
    broadcasts over the conv output's channel dimension."""
    out, kernel_ones = b_shape[0], b_shape[2:]
    return (1, out, *kernel_ones) if kernel_ones else (out,)


class DoRA(LoRA):
    """A LoRA adapter with a trainable magnitude per output row (see the module docstring).

    `magnitude` (out,) is PEFT's `lora_magnitude_vector`; the layer sets it with
    `reset_magnitude` once it knows its weight. `merged_factor` is the m / norm a merge used,
    kept until unmerge (PEFT caches it the same way).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        A = self.lora_A
        shape = magnitude_shape(tuple(self.lora_B.shape))
        self.magnitude = nn.Parameter(torch.ones(shape, dtype=A.dtype, device=A.device))
        self.merged_factor: Tensor | None = None
        self._sq_cache: tuple | None = None

    def reset_magnitude(self, weight: Tensor, rows: Tensor) -> None:
        """m = ||W + s B A|| per row of `rows` (out, in), a view of the base `weight`: f = 1."""
        with torch.no_grad():
            self.magnitude.copy_(self.norms(weight, rows).view(self.magnitude.shape))

    def weight_sq(self, weight: Tensor, rows: Tensor) -> Tensor:
        """||W_j||^2 (float32 or wider) of `rows`, a view of `weight`, cached while it is
        the same tensor, storage, dtype, device and in-place version."""
        if torch.compiler.is_compiling():
            return rows.to(_wide(rows.dtype)).square().sum(1)
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, weight.shape)
        cached = self._sq_cache
        if cached is not None and cached[0]() is weight and cached[1] == key:
            return cached[2]
        with torch.no_grad():
            value = rows.to(_wide(rows.dtype)).square().sum(1)
        self._sq_cache = (weakref.ref(weight), key, value)
        return value

    def norms(self, weight: Tensor, rows: Tensor) -> Tensor:
        """||W_j + s (B A)_j||, detached, for `rows` (out, in), a view of `weight` (PEFT's
        other norm on a grouped conv: `grouped_row_norms`)."""
        if self.groups != 1:
            return grouped_row_norms(rows, self.lora_A, self.lora_B, self.scaling)
        return row_norms(rows, self.lora_A, self.lora_B, self.scaling, self.weight_sq(weight, rows))

    def factor(self, weight: Tensor, rows: Tensor) -> Tensor:
        """f = m / ||W + s B A|| per output row, shaped as m; gradient flows to m only."""
        norms = self.norms(weight, rows).to(self.magnitude.dtype)
        return self.magnitude / norms.view(self.magnitude.shape)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state["_sq_cache"] = None  # a weak reference: neither picklable nor worth copying
        return state


def check_dora_layer(layer: LoraLayer) -> None:
    """Refuse DoRA where lorakit does not reproduce PEFT's: unsupported types, int weights."""
    if not getattr(layer, "supports_dora", False):
        raise UnsupportedLayerError(
            f"use_dora=True is not supported on {type(layer).__name__} layers; DoRA supports "
            "Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d layers"
        )
    if not layer.weight.dtype.is_floating_point:
        raise UnsupportedLayerError(
            f"use_dora=True needs a floating-point base weight; {type(layer).__name__} has "
            f"{layer.weight.dtype}"
        )


def weight_rows(layer: LoraLayer, weight: Tensor) -> Tensor:
    """`weight` (in the layer's layout) as (out, in * kernel) rows, a view: the layouts of
    lorakit's DoRA layers are (out, in, *kernel) or the transpose of (out, in), and a
    transpose is its own inverse."""
    return layer.to_weight_layout(weight).flatten(1)


def _dropping(adapter: DoRA) -> bool:
    """Whether dropout changes the input now (PEFT: not Identity and in training mode)."""
    return isinstance(adapter.dropout, nn.Dropout) and adapter.dropout.training


def dora_forward(layer: LoraLayer, adapter: DoRA, x: Tensor, y: Tensor, base: Tensor) -> Tensor:
    """y plus DoRA adapter `adapter`'s term for input x (module docstring); `base` is the
    unmerged base weight, in the layer's layout."""
    rows = weight_rows(layer, base)
    f = adapter.factor(base, rows)  # (out,), or (1, out, 1, ...) for a conv's channels
    if layer.is_embedding or not _dropping(adapter):
        bias = getattr(layer, "bias", None)
        plain = y if bias is None else y - bias.view(f.shape)
        lora = layer.lora_delta(adapter, x)
    else:
        xd = adapter.dropout(x.to(adapter.lora_A.dtype))
        if base.dim() > 2:  # a convolution: the base's conv without bias, and A, B on xd
            plain = layer._conv_forward(xd, base.to(xd.dtype), None)
            lora = layer.lora_product(adapter, xd)
        else:
            plain = F.linear(xd, rows.to(xd.dtype))
            lora = linear_delta(xd, adapter.lora_A, adapter.lora_B, adapter.scaling)
    return y + ((f - 1) * plain + f * lora).to(y.dtype)


def _column(layer: LoraLayer, f: Tensor, weight: Tensor) -> Tensor:
    """f as a factor per output row of `weight`, in the layer's layout: (out, 1, ...)."""
    return layer.to_weight_layout(f.reshape(-1, *(1,) * (weight.dim() - 1)))


def dora_merged(layer: LoraLayer, adapter: DoRA, weight: Tensor, base: Tensor) -> Tensor:
    """f * (weight + s B A), in weight's layout and dtype: PEFT's DoRA merge, f from the
    unmerged `base`. Records f in `adapter.merged_factor` for `dora_unmerged`."""
    f = adapter.factor(base, weight_rows(layer, base)).detach()
    adapter.merged_factor = f
    delta = layer.to_weight_layout(adapter.delta_weight())
    wide = _wide(weight.dtype, delta.dtype, f.dtype)
    column = _column(layer, f, weight).to(wide)
    return (column * (weight.to(wide) + delta.to(wide))).to(weight.dtype)


def dora_unmerged(layer: LoraLayer, adapter: DoRA, weight: Tensor) -> Tensor:
    """weight / f - s B A: undoes `dora_merged` up to rounding, with the f it used."""
    f = adapter.merged_factor
    if f is None:
        raise MergeError(
            "cannot unmerge a DoRA adapter whose merge factor m / ||W + s B A|| is unknown "
            "(it was not merged by this layer)"
        )
    adapter.merged_factor = None
    f = f.to(weight.device)
    delta = layer.to_weight_layout(adapter.delta_weight())
    wide = _wide(weight.dtype, delta.dtype, f.dtype)
    column = _column(layer, f, weight).to(wide)
    return (weight.to(wide) / column - delta.to(wide)).to(weight.dtype)


class _DoraScale(torch.autograd.Function):
    """y = p + d * p + b over the last dim (d = f - 1), for the fused path; saves only y.

    With d rather than f a 16-bit p loses nothing of a factor near 1 (f = 1.003 would round
    to 1 in bfloat16; d = 0.003 keeps its digits). The backward recovers p = (y - b) / f, so
    the step keeps no second (N, out) tensor: y is often saved by the next op anyway.
    """

    @staticmethod
    def forward(ctx, p: Tensor, d: Tensor, bias: Tensor | None) -> Tensor:  # noqa: ANN001
        y = torch.addcmul(p if bias is None else p + bias, p, d)
        ctx.save_for_backward(y, d, bias)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        y, d, bias = ctx.saved_tensors
        need_p, need_d, need_b = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        grad_d = grad_b = None
        if need_d:  # sum_i g_ij p_ij, with p = (y - b) / (1 + d)
            plain = y.reshape(-1, y.shape[-1])
            plain = plain if bias is None else plain - bias
            dot = plain.mul_(g2) if bias is not None else plain * g2
            wide = _wide(d.dtype)
            grad_d = (dot.sum(0, dtype=wide) / (1 + d.to(wide))).to(d.dtype)
        if need_b and bias is not None:
            grad_b = g2.sum(0)
        return (torch.addcmul(g, g, d) if need_p else None), grad_d, grad_b


def dora_rescaled(layer: LoraLayer, adapter: DoRA, p: Tensor) -> Tensor:
    """f * p + b: DoRA as the last adapter on the fused path, p = x W^T + the low-rank terms
    (no bias). Equals `dora_forward` without dropout: y + (f - 1)(y - b) + f s B A x."""
    weight = layer.weight
    d = adapter.factor(weight, weight_rows(layer, weight)) - 1  # in m's dtype, then p's
    bias = layer.bias
    return _DoraScale.apply(p, d.to(p.dtype), None if bias is None else bias.to(p.dtype))
