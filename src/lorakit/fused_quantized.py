"""The fused fast path over a bitsandbytes 4-bit base (QLoRA): W dequantized when used.

On the CPU bitsandbytes computes a `Linear4bit` by dequantizing the whole weight and calling
`F.linear` (its backward dequantizes again for grad x). The plain LoRA path then adds the
adapters' thin products on top, unfused: on SmolLM2 in NF4 they cost as much as 0.7x the
frozen base's whole step. Here the one node of `lorakit.fused` runs on W = dequantize(codes):
the same equations and kernels as on a float base (W' folded where it pays, grad x and u
from one GEMM), and the dequantized weight is never saved: the backward dequantizes it
again, as bitsandbytes does, so memory stays QLoRA's (no float copy of W outlives a call).
In training on the thin path without dropout the node is split in two, the adapters' term
first, so that checkpoint recomputation can stop before the base (`lorakit.low_rank_term`).

The base part is bitsandbytes' own numbers: the same dequantization, in the dtype the
weight was quantized from, which must be x's (float32 on the CPU by default); anything else
(a 16-bit compute dtype, autocast, CPU inference repacking, 8-bit layers, DoRA, routing)
takes the plain path (`lorakit.layers.quantized`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from bitsandbytes.functional import dequantize_4bit
from torch import Tensor, nn

from .fused import _fused_forward, _Plan, _resolved, autocast_dtype, fused_backward
from .layers.linear import _dropout_p, _with_lora_biases
from .layers.lora import LoRA
from .low_rank_term import low_rank_then_base


class _FusedTransientWeight(torch.autograd.Function):
    """`fused._FusedLoraLinear` with a weight that is not kept: `redo()` makes it again."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, redo, *factors):  # noqa: ANN001
        y, hs, masks, dscales = _fused_forward(x, weight, bias, factors, plan)
        ctx.save_for_backward(x, *factors, *hs, *masks)
        ctx.plan, ctx.dscales, ctx.has_bias, ctx.redo = plan, dscales, bias is not None, redo
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        # fused_backward's argument order has no `redo`; the weight never gets a gradient
        need = (need[0], False, need[2], False, *need[5:])
        grad_x, _, grad_b, _, *grad_factors = fused_backward(
            ctx, g, x, ctx.redo(), tuple(rest), need
        )
        return grad_x, None, grad_b, None, None, *grad_factors


def _dequantizer(codes: nn.Parameter, dtype: torch.dtype) -> Callable[[], Tensor]:
    """A function giving the (out, in) weight of 4-bit `codes` in `dtype`."""

    def dequantized() -> Tensor:
        return dequantize_4bit(codes.data, codes.quant_state).to(dtype)

    return dequantized


def fused_4bit_linear(
    x: Tensor, codes: nn.Parameter, bias: Tensor | None, adapters: Sequence[LoRA]
) -> Tensor:
    """base(x) + sum_a s_a B_a(A_a(drop_a(x))) for a `Linear4bit` with weight `codes`.

    x, the adapters' factors and the weight's original dtype agree (`fusable_adapters`).
    """
    x2 = x.reshape(-1, x.shape[-1])
    redo = _dequantizer(codes, x.dtype)
    bias = _with_lora_biases(None if bias is None else bias.to(x.dtype), list(adapters))
    scales = tuple(a.scaling for a in adapters)
    plan = _Plan(scales, tuple(_dropout_p(a) for a in adapters), None, False, None)
    shape = torch.empty(codes.quant_state.shape, dtype=x.dtype, device="meta")  # W, unmade
    plan = _resolved(plan, x2.shape[0], shape, x.dtype)
    factors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
    if torch.is_grad_enabled() and not plan.merge and not any(plan.dropout):
        y = low_rank_then_base(x2, bias, redo, factors, plan)  # recompute-friendly
    elif torch.is_grad_enabled():
        y = _FusedTransientWeight.apply(x2, redo(), bias, plan, redo, *factors)
    else:
        y, *_ = _fused_forward(x2, redo(), bias, tuple(factors), plan, keep=False)
    return y.view(*x.shape[:-1], y.shape[-1])


def fusable_adapters(layer: nn.Module, x: Tensor) -> list[LoRA]:
    """The adapters `fused_4bit_linear` adds for x on 4-bit `layer`, or []: the plain path."""
    codes = layer.weight
    state = getattr(codes, "quant_state", None)
    if layer.lora_disabled or layer.lora_routing is not None or state is None:
        return []
    if getattr(state, "packing_format_for_cpu", False) or torch.compiler.is_compiling():
        return []
    dtype = x.dtype
    if not dtype.is_floating_point or autocast_dtype(x.device.type) is not None:
        return []
    if state.dtype != dtype or layer.compute_dtype not in (None, dtype):
        return []
    adapters = [layer.lora[n] for n in layer.lora_active if n not in layer.lora_merged]
    for adapter in adapters:
        if type(adapter) is not LoRA or type(adapter.dropout) not in (nn.Dropout, nn.Identity):
            return []
        if adapter.lora_A.dtype != dtype or adapter.lora_A.device != x.device:
            return []
    return adapters
