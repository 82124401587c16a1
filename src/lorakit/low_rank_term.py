"""Two nodes instead of one over a frozen, dequantized base: the adapters' term first.

Under gradient checkpointing (non-reentrant, as transformers runs it) a block's forward runs
again in the backward until every tensor the backward needs is saved again, and stops there.
A frozen bitsandbytes layer saves no activation, so the recomputation of a frozen block
stops before its last layers; an adapter saves x and h, so with the single fused node
(`lorakit.fused`) the recomputation must run the block's last adapted layer whole: its
dequantization and big GEMM, only to save x and h again. On TinyLlama's shape that was half
of what a QLoRA step cost above the frozen base.

So over a 4-bit base (thin path, no dropout) the layer is two nodes, in this order:

    low-rank node:  z = sum_a s_a h_a B_a^T,  h_a = x A_a^T      saves x, the factors, h_a
    base node:      y = x W^T + z (+ b),  W = dequantize(codes)  saves nothing
        backward:   grad x = g W (W dequantized again), grad z = g, grad b = sum_N g

The low-rank node packs its tensors before the base node runs, so a recomputation can stop
before the base GEMM. The low-rank node's backward is the fused node's (`_low_rank_grads`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .fused import _low_rank_grads, _Plan, _scaled_mm, thin_product


class _LowRankTerm(torch.autograd.Function):
    """z = sum_a s_a (x A_a^T) B_a^T for 2D x, no dropout (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, plan, *factors):  # noqa: ANN001
        hs = [thin_product(x, factors[2 * i]) for i in range(len(plan.scales))]
        z = None
        for h, s, B in zip(hs, plan.scales, factors[1::2]):
            z = _scaled_mm(h, B.t(), s) if z is None else z.addmm_(h, B.t(), alpha=s)
        ctx.save_for_backward(x, *factors, *hs)
        ctx.plan = plan
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, *rest = ctx.saved_tensors
        plan, need = ctx.plan, ctx.needs_input_grad
        n = len(plan.scales)
        tensors = (*rest, *([None] * n))  # factors, h_a and (no) masks
        fused_need = (need[0], False, False, False, *need[2:])  # in the fused node's order
        if not g.is_contiguous():
            g = g.contiguous()
        grad_x, grad_factors = _low_rank_grads(g, x, tensors, [1.0] * n, plan, fused_need)
        return grad_x, None, *grad_factors


class _FrozenBase(torch.autograd.Function):
    """y = x W^T + z (+ b) with W = redo(): keeps no tensor (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, z, bias, redo):  # noqa: ANN001
        ctx.redo, ctx.has_bias = redo, bias is not None
        y = torch.addmm(z, x, weight.t())
        return y if bias is None else y.add_(bias)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        need = ctx.needs_input_grad
        grad_x = g @ ctx.redo() if need[0] else None
        grad_b = g.sum(0) if need[3] and ctx.has_bias else None
        return grad_x, None, g if need[2] else None, grad_b, None


def low_rank_then_base(
    x: Tensor, bias: Tensor | None, redo: Callable[[], Tensor], factors: list[Tensor],
    plan: _Plan,
) -> Tensor:  # fmt: skip
    """x W^T + b + sum_a s_a B_a A_a x for 2D x, W = redo(), as the two nodes above (plan:
    thin, no dropout). W is made only after the low-rank node, used and let go: a
    recomputation that stops at that node neither dequantizes nor multiplies by W."""
    z = _LowRankTerm.apply(x, plan, *factors)
    return _FrozenBase.apply(x, redo(), z, bias, redo)
