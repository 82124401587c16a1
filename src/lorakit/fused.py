"""The fused fast path: y = x W^T + b + sum_a s_a * B_a(A_a(drop_a(x))) as one autograd node.

One node per adapted Linear / GPT-2 Conv1D, for N tokens, W (out, in) frozen, k_a the 0/1
dropout keep-mask of adapter a, d_a = 1 / (1 - p_a) and s'_a = s_a d_a:

    forward:   h_a = d_a (k_a * x) A_a^T  (N, r);  y = b + sum_a s_a h_a B_a^T;  y += x W^T
    backward:  u_a = g B_a  (N, r)
               grad_x = sum_a s'_a (u_a A_a) * k_a + g W,  grad_A_a = s'_a u_a^T (k_a * x),
               grad_B_a = s_a (h_a^T g)^T,  grad_b = sum_N g

The scales ride on the GEMMs as their alpha: no pass over y, h or u of their own (with
dropout, u_a is scaled by s'_a before its masked products, and h_a by d_a as it is taken).
It keeps x (the caller's tensor, no copy), each h_a (N, r) and, with dropout, each mask k_a
as booleans, never computes a gradient for W unless W asks for one. Masks come from the
global generator, as nn.Dropout's: on the CPU from `lorakit.dropout_masks` (16-bit draws,
applied block by block); on CUDA from PyTorch's fused dropout kernel, which writes
k * x / (1 - p) and k in one pass. The big GEMMs (x W^T, g W) run first, on their own, and
the thin rank-r products add into their result (beta = 1 on the thin GEMM: a big GEMM that
accumulates into a buffer ran up to 15% slower on CPU BLAS at TinyLlama's sizes). What
remains is four thin GEMMs per layer, each one pass over x or g, with the thin side laid out
(r, N) (`thin_product`), which runs faster than (N, r) on CPU BLAS.
Float32 factors computed in another dtype (bf16 autocast, a bf16 base) are multiplied as cast
copies kept between calls (`lorakit.compute_copies`), while the float32 factors are the
node's inputs.

When the tokens outweigh the weight and there is no dropout, the low-rank term is cheaper
folded into the weight: W' = W + sum_a s_a B_a A_a costs passes over W, where the thin path
costs a pass over y (y += h B^T) and, in inference, one over x (h); in a train step also one
over grad_x (grad_x += u A). Then y = x W'^T and grad_x = g W' (W' computed again in
backward, never stored; grad_x and the u_a from one GEMM, `lorakit.folded_grad`); a train
step still computes h for grad_B. Measured on a CPU (rank
8 and 64, hidden 512 and 1376; benchmarks/layer_costs.py, benchmarks/train_step.py): it pays
from N (in + out) >= 4 in out on, in inference and training alike. In float32 and float64
only: in 16-bit formats W' would round the small low-rank term away, so those stay thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .compute_copies import factors_in_dtype
from .dropout_masks import dropped_product, masked_grads
from .folded_grad import folded_grads

# Devices where PyTorch's own fused dropout kernel (`native_dropout`: the dropped, scaled x and
# its boolean mask in one pass, from the global generator) is cheaper than drawing
# 16-bit masks: random numbers cost little there, a kernel launch more.
_FUSED_DROPOUT_DEVICES = ("cuda",)

_MERGE_DTYPES = (torch.float32, torch.float64)

_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on `device_type`, or None when autocast is off there."""
    # CPU and CUDA always have autocast; asking only for others (e.g. "meta", which has none)
    # keeps torch.compile tracing: dynamo 2.11 cannot trace `is_autocast_available`.
    if device_type not in _AUTOCAST_DEVICES and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _merge_allowed(weight: Tensor, dropout: tuple[float, ...]) -> bool:
    """W' is exact only without dropout and in a wide dtype (see the module docstring)."""
    return not any(dropout) and weight.dtype in _MERGE_DTYPES


def merge_pays(n_tokens: int, weight: Tensor, dropout: tuple[float, ...]) -> bool:
    """Whether folding the adapters into W' beats adding their thin products (module doc)."""
    if not _merge_allowed(weight, dropout):
        return False
    rows, cols = weight.shape  # (out, in) or (in, out): the rule is symmetric
    return n_tokens * (rows + cols) >= 4 * rows * cols


def _merged(
    weight: Tensor, factors: tuple[Tensor, ...], scales: tuple[float, ...], transposed: bool
) -> Tensor:
    """W' = W + sum_a s_a B_a A_a, in W's layout: (out, in), or (in, out) when `transposed`."""
    merged = None
    for i, s in enumerate(scales):
        A, B = factors[2 * i], factors[2 * i + 1]
        lhs, rhs = (A.t(), B.t()) if transposed else (B, A)
        if merged is None:  # one new W-sized tensor, the other adapters add into it
            merged = torch.addmm(weight, lhs, rhs, alpha=s)
        else:
            merged.addmm_(lhs, rhs, alpha=s)
    return weight if merged is None else merged


class _Plan(NamedTuple):
    """The fused op's non-tensor arguments, passed to the autograd node as one object.

    `merge` is None until `_resolved` decides it.
    """

    scales: tuple[float, ...]
    dropout: tuple[float, ...]
    seed: int | None
    transposed: bool
    merge: bool | None


def _resolved(plan: _Plan, n_tokens: int, weight: Tensor, dtype: torch.dtype) -> _Plan:
    """`plan` with float scales and dropout, and `merge` decided (None: by `merge_pays`)."""
    scales = tuple(map(float, plan.scales))
    dropout = tuple(map(float, plan.dropout))
    merge = plan.merge
    if merge is None:
        merge = merge_pays(n_tokens, weight, dropout)
    merge = merge and weight.dtype == dtype and _merge_allowed(weight, dropout)
    return _Plan(scales, dropout, plan.seed, plan.transposed, merge)


def _scaled_mm(a: Tensor, b: Tensor, s: float, bias: Tensor | None = None) -> Tensor:
    """s a b (+ bias), s as the GEMM's alpha: no pass over the result of its own."""
    if bias is not None:
        return torch.addmm(bias, a, b, alpha=s)
    if s == 1.0:
        return a @ b
    if torch.compiler.is_compiling():  # inductor fuses the scale; beta = 0 on an empty
        return (a @ b) * s  # tensor would meet its rank-1 decomposition (0 * NaN)
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=s)


def _dropout_h(x: Tensor, A: Tensor, p: float, seed: int | None) -> tuple[Tensor, Tensor, float]:
    """(h, keep, d) for 2D x: h = drop(x) A^T = d (keep * x) A^T (N, r), d = 1 / (1 - p).

    On CUDA, `native_dropout` gives the dropped, scaled x and the mask in one pass, from the
    global generator; on the CPU the mask comes from `dropout_masks` (p' to 2**-16,
    d = 1 / (1 - p')) and is applied block by block as the product is taken.
    """
    if x.device.type in _FUSED_DROPOUT_DEVICES:
        x_in, keep = torch.native_dropout(x, p, True)
        return x_in @ A.t(), keep, 1.0 / (1.0 - p)
    return dropped_product(x, A, 1.0, p, seed)


def thin_product(x: Tensor, A: Tensor) -> Tensor:
    """x A^T (N, r) for x (N, in), A (r, in): taken as A x^T (r, N), returned transposed.

    On CPU BLAS (MKL, one core, N 2048, r 8) the (r, N) layout runs 1.5x (in 512) to 3.4x
    (g B with out 1376) faster than (N, r); and h^T, u^T come out contiguous for the
    reductions over N that follow (grad B = (h^T g)^T, grad A = u^T x).
    """
    return (A @ x.t()).t()


def _base_product(x: Tensor, w_t: Tensor, bias: Tensor | None) -> Tensor:
    """x w_t + bias for x (N, in), w_t (in, out)."""
    return x @ w_t if bias is None else torch.addmm(bias, x, w_t)


def _merged_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, factors: tuple[Tensor, ...], plan: _Plan,
    keep: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor | None], list[float]]:  # fmt: skip
    """`_fused_forward` through W' (no dropout): y = x W'^T + b, and h_a for the backward."""
    scales = plan.scales
    w_t = _merged(weight, factors, scales, plan.transposed)
    y = _base_product(x, w_t if plan.transposed else w_t.t(), bias)
    hs = [thin_product(x, factors[2 * i]) for i in range(len(scales))] if keep else []
    return y, hs, [None] * len(scales), [1.0] * len(scales)


def _fused_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    factors: tuple[Tensor, ...],
    plan: _Plan,
    keep: bool = True,
) -> tuple[Tensor, list[Tensor], list[Tensor | None], list[float]]:
    """(y, [h_a], [keep_a], [d_a]) for 2D x (N, in); see the equations above.

    keep_a is adapter a's boolean dropout mask (None without dropout) and d_a = 1 / (1 - p_a).

    keep: compute h_a (and keep the masks) for a backward; False in inference.
    """
    if plan.merge:
        return _merged_forward(x, weight, bias, factors, plan, keep)
    w_t = weight if plan.transposed else weight.t()  # (in, out), a view either way
    y = _base_product(x, w_t, bias)  # the big GEMM first: the thin terms add into y
    hs, masks, dscales = [], [], []
    for i, (s, p) in enumerate(zip(plan.scales, plan.dropout)):
        A, B = factors[2 * i], factors[2 * i + 1]
        if p == 0:  # h: (N, r); s rides on the GEMM that adds h B^T
            h, mask, d = thin_product(x, A), None, 1.0
        else:
            seed = None if plan.seed is None else plan.seed + i
            h, mask, d = _dropout_h(x, A, p, seed)
        y.addmm_(h, B.t(), alpha=s)
        hs.append(h)
        masks.append(mask)
        dscales.append(d)
    return y, hs, masks, dscales


def _low_rank_grads(
    g: Tensor, x: Tensor, tensors: tuple[Tensor, ...], dscales: list[float], plan: _Plan,
    need: tuple[bool, ...], us: list[Tensor] | None = None, grad_x: Tensor | None = None,
) -> tuple[Tensor | None, list[Tensor | None]]:  # fmt: skip
    """(grad_x plus its low-rank part, [grad_A_a, grad_B_a, ...]); see the equations above.

    tensors: the saved factors, h_a and masks; need: the node's `needs_input_grad`;
    us: the u_a when taken already (`lorakit.folded_grad`); grad_x: g W, added to in place.
    """
    n = len(plan.scales)
    factors, hs, masks = tensors[: 2 * n], tensors[2 * n : 3 * n], tensors[3 * n :]
    grad_factors: list[Tensor | None] = []
    for i, (s, d) in enumerate(zip(plan.scales, dscales)):
        A, B, h, keep = factors[2 * i], factors[2 * i + 1], hs[i], masks[i]
        need_a, need_bb = need[4 + 2 * i], need[5 + 2 * i]
        grad_b_a = _scaled_mm(h.t(), g, s).t() if need_bb else None  # (out, r), g in cache
        if plan.merge and not need_a:
            grad_factors += [None, grad_b_a]
            continue
        u = us[i] if us is not None else thin_product(g, B.t())  # (N, r) = g B
        grad_a = None
        if keep is not None:  # dropout: never merged
            blocks = x.device.type not in _FUSED_DROPOUT_DEVICES
            u.mul_(s * d)  # the masked products take no alpha
            term, grad_a = masked_grads(u, A, x, keep, need[0], need_a, blocks)
            if term is not None:
                grad_x = term if grad_x is None else grad_x.add_(term)
        else:
            if need[0] and not plan.merge:
                grad_x = _scaled_mm(u, A, s) if grad_x is None else grad_x.addmm_(u, A, alpha=s)
            if need_a:
                grad_a = _scaled_mm(u.t(), x, s)  # (r, in)
        grad_factors += [grad_a, grad_b_a]
    return grad_x, grad_factors


class _FusedLoraLinear(torch.autograd.Function):
    """Autograd node of `fused_lora_linear` on 2D inputs (see the module docstring); the
    factors may be followed by their compute copies, multiplied in their place."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *tensors):  # noqa: ANN001
        n = 2 * len(plan.scales)
        factors = tensors[n:] or tensors[:n]
        y, hs, masks, dscales = _fused_forward(x, weight, bias, factors, plan)
        ctx.save_for_backward(x, weight, *factors, *hs, *masks)
        ctx.plan, ctx.dscales, ctx.has_bias = plan, dscales, bias is not None
        ctx.copies = len(tensors) - n
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, *rest = ctx.saved_tensors
        grads = fused_backward(ctx, g, x, weight, tuple(rest), ctx.needs_input_grad)
        return *grads, *(None,) * ctx.copies  # the compute copies get none


def fused_backward(
    ctx: object, g: Tensor, x: Tensor, weight: Tensor, rest: tuple[Tensor, ...],
    need: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:  # fmt: skip
    """(grad x, grad W, grad b, None, grad A_1, grad B_1, ...): the fused node's backward.

    ctx carries `plan`, `dscales`, `has_bias`; rest: the saved factors, h_a and masks; need:
    `needs_input_grad` in `_FusedLoraLinear`'s argument order.
    """
    plan = ctx.plan
    if not g.is_contiguous():
        g = g.contiguous()
    grad_x, us = None, None
    if need[0] and plan.merge:  # g W' and every u_a from one GEMM
        factors = rest[: 2 * len(plan.scales)]
        grad_x, us = folded_grads(g, weight, factors, plan.scales, plan.transposed)
    elif need[0]:  # the big GEMM first: the thin terms add into its result
        grad_x = g @ (weight.t() if plan.transposed else weight)  # (out, in)
    grad_x, grad_factors = _low_rank_grads(g, x, rest, ctx.dscales, plan, need, us, grad_x)
    grad_w = None
    if need[1]:
        grad_w = x.t() @ g if plan.transposed else g.t() @ x
    grad_b = g.sum(0) if need[2] and ctx.has_bias else None
    return grad_x, grad_w, grad_b, None, *grad_factors


def _needs_graph(*tensors: Tensor | None) -> bool:
    """Whether autograd must record: grad mode is on and some tensor requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_in_x_dtype(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Sequence[Tensor],
    lora_B: Sequence[Tensor], plan: _Plan,
) -> Tensor:  # fmt: skip
    """`fused_lora_linear` outside autocast: computes in x's dtype."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # a view for contiguous x: nothing copied
    graph = _needs_graph(x2, weight, bias, *lora_A, *lora_B)
    factors, computes = factors_in_dtype(lora_A, lora_B, dtype)
    if bias is not None and bias.dtype is not dtype:
        bias = bias.to(dtype)
    plan = _resolved(plan, x2.shape[0], weight, dtype)
    if graph:
        copies = computes if any(c is not f for c, f in zip(computes, factors)) else ()
        y = _FusedLoraLinear.apply(x2, weight, bias, plan, *factors, *copies)
    else:  # inference: the same kernels, and no autograd node to keep anything alive
        y, *_ = _fused_forward(x2, weight, bias, tuple(computes), plan, keep=False)
    return y.view(*x.shape[:-1], y.shape[-1])


def fused_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: tuple[Tensor, ...],
    lora_B: tuple[Tensor, ...],
    scales: tuple[float, ...],
    *,
    dropout: tuple[float, ...] | None = None,
    seed: int | None = None,
    transposed: bool = False,
    merge: bool | None = None,
) -> Tensor:
    """y = x W^T + b + sum_a s_a * B_a(A_a(drop_a(x))), as one autograd node.

    x: (..., in); weight: (out, in), or (in, out) with `transposed` (GPT-2's Conv1D);
    bias: (out,) or None; lora_A[a]: (r_a, in); lora_B[a]: (out, r_a); returns (..., out).
    dropout[a] is adapter a's dropout probability (default 0); its mask comes from the global
    generator (on the CPU via `dropout_keep`, p to 2**-16; on CUDA from `torch.native_dropout`,
    exact p), or on the CPU with an int `seed` from a private generator seeded with `seed + a`,
    and is kept as booleans for the backward (never a copy of x).
    Computes in x's dtype (adapter factors are cast to it: a tiny copy, never one of x, kept
    between calls while the factor is unchanged: `compute_copies`); under autocast, in
    autocast's dtype.
    Gradients flow to x, A, B, and to weight and bias only when they require grad.
    `merge` folds the adapters into a transient W' (see above); None decides by `merge_pays`.
    """
    if dropout is None:
        dropout = (0.0,) * len(scales)
    assert len(lora_A) == len(lora_B) == len(scales) == len(dropout)
    plan = _Plan(scales, dropout, seed, transposed, merge)
    dtype = autocast_dtype(x.device.type)
    if dtype is None or not x.is_floating_point():
        return _fused_in_x_dtype(x, weight, bias, lora_A, lora_B, plan)
    with torch.autocast(x.device.type, enabled=False):  # the factors: `factors_in_dtype`
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return _fused_in_x_dtype(x, weight, bias, lora_A, lora_B, plan)
