"""LoRA input products of layers that read one input, taken as one GEMM: the autograd nodes.

Layers i = 1..k that read the same x (q, k, v of an attention block; gate and up of a gated
MLP) each need x A_i^T. Taken together, one GEMM reads x once where k thin GEMMs read it
k times, in the forward and again for grad A in the backward. Two kinds of node do it, for N
tokens, R = r_1 + ... + r_k and s_i the adapters' scales:

    product node (one per set):  H^T = [A_1; ...; A_k] x^T (R, N), split into h_i^T (r_i, N)
        backward:                grad [A_1; ...; A_k] = grad_H^T x       one GEMM for the set
    layer node (one per layer):  y_i = x W_i^T + b_i + s_i h_i B_i^T   (or x W_i'^T + b_i)
        backward:                u_i = s_i g_i B_i = grad h_i,  grad B_i = s_i (h_i^T g_i)^T,
                                 grad x += g_i W_i + u_i A_i            (or g_i W_i')
        (folded: g_i W_i' and u_i from one GEMM, `lorakit.folded_grad`)

The product node takes x detached: the low-rank part of grad x, u_i A_i, is the layer node's,
so that it can be folded, as in `lorakit.fused`, into a transient W_i' = W_i + s_i B_i A_i
when the tokens outweigh the weight (`fused.merge_pays`). A_i enters the layer node for that
alone; its gradient reaches it through h_i and the product node. Without dropout only (with
dropout each layer draws its own mask, so the layers' inputs to A differ) and in x's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .folded_grad import folded_grads
from .fused import _base_product, _merged, _needs_graph, _scaled_mm, merge_pays


class _StackedProduct(torch.autograd.Function):
    """H^T = [A_1; ...; A_k] x^T (R, N) for 2D x (N, in); gradients to the A's only (see
    above). (R, N), not (N, R): the layout thin GEMMs run fastest in (`fused.thin_product`)."""

    @staticmethod
    def forward(ctx, x, *factors):  # noqa: ANN001
        ctx.save_for_backward(x)
        ctx.ranks = tuple(A.shape[0] for A in factors)
        return _stacked(factors) @ x.t()

    @staticmethod
    def backward(ctx, grad_h_t):  # noqa: ANN001
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        grads = (grad_h_t @ x).split(ctx.ranks)  # (R, in): one pass over x for the set
        return None, *(g if n else None for g, n in zip(grads, need))


def _stacked(factors: Sequence[Tensor]) -> Tensor:
    """[A_1; ...; A_k] (R, in): a small copy, or A_1 itself for one layer."""
    return factors[0] if len(factors) == 1 else torch.cat(tuple(factors))


def stacked_products(x: Tensor, factors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """(h_1, ..., h_k), h_i = x A_i^T (N, r_i), from one GEMM; x 2D, factors in x's dtype.

    Transposed views of one (R, N) tensor; in a graph, A_i's gradient comes from the product node.
    """
    ranks = [A.shape[0] for A in factors]
    if _needs_graph(*factors):
        product_t = _StackedProduct.apply(x.detach(), *factors)
    else:
        product_t = _stacked(factors) @ x.t()
    return tuple(h_t.t() for h_t in product_t.split(ranks))


class _LayerPlan(NamedTuple):
    """The layer node's non-tensor arguments: the adapter's scale, W's layout, fold or not."""

    scale: float
    transposed: bool
    merge: bool


def _layer_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, A: Tensor, B: Tensor,
    plan: _LayerPlan,
) -> Tensor:  # fmt: skip
    """y = x W^T + b + s h B^T for 2D x, through W' when `plan.merge` (see above)."""
    if plan.merge:
        w = _merged(weight, (A, B), (plan.scale,), plan.transposed)
        return _base_product(x, w if plan.transposed else w.t(), bias)
    y = _base_product(x, weight if plan.transposed else weight.t(), bias)  # the big GEMM first
    return y.addmm_(h, B.t(), alpha=plan.scale)  # s as the GEMM's alpha: no op of its own


class _GivenProductLinear(torch.autograd.Function):
    """Layer node: y = x W^T + b + s h B^T with h = x A^T taken by the product node."""

    @staticmethod
    def forward(ctx, x, weight, bias, h, A, B, plan):  # noqa: ANN001
        ctx.save_for_backward(x, weight, h, A, B)
        ctx.plan, ctx.has_bias = plan, bias is not None
        return _layer_forward(x, weight, bias, h, A, B, plan)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, h, A, B = ctx.saved_tensors
        plan, need = ctx.plan, ctx.needs_input_grad
        g = g if g.is_contiguous() else g.contiguous()
        grad_lora_b = _scaled_mm(h.t(), g, plan.scale).t() if need[5] else None  # (out, r)
        s = plan.scale
        if need[0] and plan.merge:  # g W' and u = s g B from one GEMM
            grad_x, (u,) = folded_grads(g, weight, (A, B), (s,), plan.transposed, u_scale=s)
        else:  # u = s g B = grad h, taken as (r, N) (`fused.thin_product`)
            u = _scaled_mm(B.t(), g.t(), s).t() if need[3] or need[0] else None
            grad_x = (g @ _out_in(weight, plan)).addmm_(u, A) if need[0] else None
        grad_w = None
        if need[1]:
            grad_w = x.t() @ g if plan.transposed else g.t() @ x
        grad_bias = g.sum(0) if need[2] and ctx.has_bias else None
        return grad_x, grad_w, grad_bias, u if need[3] else None, None, grad_lora_b, None


def _out_in(weight: Tensor, plan: _LayerPlan) -> Tensor:
    """W as (out, in): a view of GPT-2's (in, out) weight."""
    return weight.t() if plan.transposed else weight


def given_product_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, h: Tensor, A: Tensor, B: Tensor,
    scale: float, transposed: bool = False,
) -> Tensor:  # fmt: skip
    """y = x W^T + b + s h B^T for x (..., in) and h = x A^T (N, r) from `stacked_products`.

    x, weight, h, A, B (and bias) share x's dtype; weight is (out, in), or (in, out) with
    `transposed` (GPT-2's Conv1D). Returns (..., out). A gets no gradient here: it arrives
    through h (see the module docstring).
    """
    x2 = x.reshape(-1, x.shape[-1])
    plan = _LayerPlan(float(scale), transposed, merge_pays(x2.shape[0], weight, (0.0,)))
    if _needs_graph(x2, weight, bias, h, B):
        y = _GivenProductLinear.apply(x2, weight, bias, h, A, B, plan)
    else:
        y = _layer_forward(x2, weight, bias, h, A, B, plan)
    return y.view(*x.shape[:-1], y.shape[-1])
