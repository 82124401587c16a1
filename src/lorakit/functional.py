"""Pure LoRA math: the low-rank product, the delta weight, merge and unmerge.

Shapes follow PEFT's: A is (r, in, *kernel), B is (out, r, *ones); s is the scale.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_delta(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * B (A x) for x (..., in) -> (..., out)."""
    return (x @ A.t()) @ B.t() * scale


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """s * B A, the dense update of a weight (out, in, *kernel).

    A: (r, in, *kernel), B: (out, r, *ones); for a Linear this is just s * B @ A.
    """
    rank = A.shape[0]
    dense = B.reshape(B.shape[0], rank) @ A.reshape(rank, -1)
    return (dense * scale).reshape(B.shape[0], *A.shape[1:])


def merged_weight(weight: Tensor, delta: Tensor, sign: int = 1) -> Tensor:
    """weight + sign * delta, computed in the wider of the two dtypes, cast back to weight's."""
    wide = torch.promote_types(weight.dtype, delta.dtype)
    return (weight.to(wide) + sign * delta.to(wide)).to(weight.dtype)


# -- the fused fast path ------------------------------------------------------------------
#
# One autograd node per adapted Linear / GPT-2 Conv1D, for N tokens, W (out, in) frozen:
#
#     forward:   y = x W^T + b;  h_a = s_a * drop_a(x) A_a^T  (N, r);  y += h_a B_a^T  (in place)
#     backward:  grad_x = g W + sum_a s_a * ((g B_a) A_a) * mask_a
#                grad_A_a = s_a * (g B_a)^T drop_a(x),  grad_B_a = g^T h_a,  grad_b = sum_N g
#
# It keeps only x (the caller's tensor, no copy) and each h_a (N, r) for the backward, never
# computes a gradient for W unless W asks for one, and regenerates dropout masks from a seed
# instead of storing a dropped copy of x.


def dropout_mask(
    shape: tuple[int, ...], p: float, seed: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Inverted-dropout mask: each entry is 0 with probability p, else 1 / (1 - p).

    Deterministic in `seed` (a private generator, so the global RNG stream is not consumed);
    the fused op calls it twice with the same seed, in forward and in backward.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    mask = torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)
    return mask.div_(1.0 - p)


def _fused_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factors: tuple[Tensor, ...],
    scales: tuple[float, ...],
    dropout: tuple[float, ...],
    seed: int,
    transposed: bool,
) -> tuple[Tensor, list[Tensor]]:
    """(y, [h_a]) for 2D x (N, in); see the equations above."""
    w_t = weight if transposed else weight.t()  # (in, out), a view either way
    y = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    hs = []
    for i, (s, p) in enumerate(zip(scales, dropout)):
        A, B = factors[2 * i], factors[2 * i + 1]
        xa = x if p == 0 else dropout_mask(x.shape, p, seed + i, x.device, x.dtype).mul_(x)
        h = (xa @ A.t()).mul_(s)  # (N, r): s folded in here, so grad_B is just g^T h
        y.addmm_(h, B.t())
        hs.append(h)
    return y, hs


class _FusedLoraLinear(torch.autograd.Function):
    """Autograd node of `fused_lora_linear` on 2D inputs (see the module comment)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scales, dropout, seed, transposed, *factors):  # noqa: ANN001
        y, hs = _fused_forward(x, weight, bias, factors, scales, dropout, seed, transposed)
        ctx.save_for_backward(x, weight, *factors, *hs)
        ctx.scales, ctx.dropout, ctx.seed, ctx.transposed = scales, dropout, seed, transposed
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, hs = rest[: 2 * n], rest[2 * n :]
        need = ctx.needs_input_grad
        need_x, need_w, need_b = need[0], need[1], need[2] and ctx.has_bias
        g = g.contiguous()
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = g @ (weight.t() if ctx.transposed else weight)  # (N, in)
        if need_w:
            grad_w = x.t() @ g if ctx.transposed else g.t() @ x
        if need_b:
            grad_b = g.sum(0)
        grad_factors: list[Tensor | None] = []
        for i, (s, p) in enumerate(zip(ctx.scales, ctx.dropout)):
            A, B, h = factors[2 * i], factors[2 * i + 1], hs[i]
            need_a, need_bb = need[7 + 2 * i], need[8 + 2 * i]
            gb = (g @ B).mul_(s)  # (N, r) = s * g B
            mask = None if p == 0 else dropout_mask(x.shape, p, ctx.seed + i, x.device, x.dtype)
            if need_x:
                if mask is None:
                    grad_x.addmm_(gb, A)
                else:
                    grad_x.add_((gb @ A).mul_(mask))
            grad_a = None
            if need_a:
                xa = x if mask is None else mask.mul_(x)
                grad_a = gb.t() @ xa  # (r, in)
            grad_factors += [grad_a, g.t() @ h if need_bb else None]  # (out, r)
        return grad_x, grad_w, grad_b, None, None, None, None, *grad_factors


def fused_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: tuple[Tensor, ...],
    lora_B: tuple[Tensor, ...],
    scales: tuple[float, ...],
    *,
    dropout: tuple[float, ...] | None = None,
    seed: int = 0,
    transposed: bool = False,
) -> Tensor:
    """y = x W^T + b + sum_a s_a * B_a(A_a(drop_a(x))), as one autograd node.

    x: (..., in); weight: (out, in), or (in, out) with `transposed` (GPT-2's Conv1D);
    bias: (out,) or None; lora_A[a]: (r_a, in); lora_B[a]: (out, r_a); returns (..., out).
    dropout[a] is adapter a's dropout probability (default 0); masks come from `seed + a`,
    drawn by `dropout_mask`, so they are never stored. Computes in x's dtype (adapter factors
    are cast to it: a tiny copy, never one of x); under autocast, in autocast's dtype.
    Gradients flow to x, A, B, and to weight and bias only when they require grad.
    """
    if dropout is None:
        dropout = (0.0,) * len(scales)
    assert len(lora_A) == len(lora_B) == len(scales) == len(dropout)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return fused_lora_linear(
                x.to(dtype),
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                tuple(A.to(dtype) for A in lora_A),
                tuple(B.to(dtype) for B in lora_B),
                scales,
                dropout=dropout,
                seed=seed,
                transposed=transposed,
            )
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # a view for contiguous x: nothing copied
    factors = tuple(t.to(dtype) for A, B in zip(lora_A, lora_B) for t in (A, B))
    scales = tuple(float(s) for s in scales)
    dropout = tuple(float(p) for p in dropout)
    if bias is not None:
        bias = bias.to(dtype)
    tensors = (x2, weight, bias, *factors)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y = _FusedLoraLinear.apply(x2, weight, bias, scales, dropout, seed, transposed, *factors)
    else:  # inference: the same kernels, and no autograd node to keep anything alive
        y, _ = _fused_forward(x2, weight, bias, factors, scales, dropout, seed, transposed)
    return y.view(*x.shape[:-1], y.shape[-1])
