"""Pure LoRA math: the low-rank product, the delta weight, merge and unmerge.

Shapes follow PEFT's: A is (r, in, *kernel), B is (out, r, *ones); s is the scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
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
# One autograd node per adapted Linear / GPT-2 Conv1D, for N tokens, W (out, in) frozen,
# k_a the 0/1 dropout keep-mask of adapter a and s'_a = s_a / (1 - p_a):
#
#     forward:   h_a = s'_a * (k_a * x) A_a^T  (N, r);  y = b + sum_a h_a B_a^T;  y += x W^T
#     backward:  u_a = s'_a * g B_a  (N, r)
#                grad_x = sum_a (u_a A_a) * k_a + g W,  grad_A_a = u_a^T (k_a * x),
#                grad_B_a = (h_a^T g)^T,  grad_b = sum_N g
#
# It keeps x (the caller's tensor, no copy), each h_a (N, r) and, with dropout, each mask k_a
# as booleans (one byte per entry, where a dropped copy of x costs two or four), never
# computes a gradient for W unless W asks for one. Masks come from the global generator, as
# nn.Dropout's: on the CPU as four 16-bit draws per 64-bit word, applied block by block (k * x
# is never materialised: see `_BLOCK`); on CUDA from PyTorch's fused dropout kernel, which
# writes k * x / (1 - p) and k in one pass. The big GEMMs (x W^T, g W)
# accumulate into the buffer the thin rank-r products started (beta = 1), so the low-rank
# terms cost no extra pass over y or grad_x. What remains is four thin GEMMs per layer, each
# one pass over x or g, laid out (N, r), which runs faster than (r, N) on CPU BLAS.
#
# When the tokens outweigh the weight and there is no dropout, the low-rank term is cheaper
# folded into the weight: W' = W + sum_a s_a B_a A_a costs passes over W, where the thin path
# costs a pass over y (y += h B^T) and, in inference, one over x (h); in a train step also one
# over grad_x (grad_x += u A). Then y = x W'^T and grad_x = g W' (W' computed again in
# backward, never stored); a train step still computes h for grad_B. Measured on a CPU (rank
# 8 and 64, hidden 512 and 1376; benchmarks/layer_costs.py, benchmarks/train_step.py): it pays
# from N (in + out) >= 4 in out on, in inference and training alike. In float32 and float64
# only: in 16-bit formats W' would round the small low-rank term away, so those stay thin.

_KEEP_BITS = 16  # resolution of the dropout probability: multiples of 2**-16

# Masks are applied on the CPU in row blocks of about this many entries: x times the mask's
# bytes (read as uint8) into one small buffer that stays in cache, which the thin GEMM then
# reads. `torch.where(keep, x, 0)` or `x * keep` over the whole (N, in) tensor run 2-3x slower:
# their kernels are not vectorised for bool, and every fresh N x in tensor is page-faulted in.
_BLOCK = 1 << 16


def _keep_threshold(p: float) -> tuple[int, float]:
    """(t, p'): an int16 word w keeps its element when w >= t, which happens with 1 - p'.

    p' is p rounded to a multiple of 2**-16 (|p' - p| <= 7.7e-6); the kept values are scaled
    by 1 / (1 - p'), so the mask has mean exactly 1, as ordinary (inverted) dropout.
    """
    levels = 1 << _KEEP_BITS
    dropped = round(p * levels)
    return dropped - levels // 2, dropped / levels


def dropout_keep(
    shape: tuple[int, ...], p: float, seed: int | None, device: torch.device
) -> Tensor:
    """Boolean keep-mask: each entry False with probability p (to 2**-16).

    Four entries per 64-bit random word (16 bits each); about 4x cheaper than `bernoulli_`,
    which draws one word per entry. The words come from the global generator, as
    `nn.Dropout`'s do (so `torch.manual_seed` reproduces them), or with an int `seed` from a
    private generator seeded with it, leaving the global stream alone. The fused op draws its
    CPU masks here and keeps them as booleans for the backward.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)  # every bit uniform (no modulo: cheaper)
    threshold, _ = _keep_threshold(p)
    return words.view(torch.int16)[:n].view(shape) >= threshold


def _row_blocks(x: Tensor, keep: Tensor, *others: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Row blocks of 2D x: (x[rows], keep[rows] as uint8, a buffer like x[rows], *others[rows]).

    The buffer is one reused tensor of about `_BLOCK` entries, so it stays in cache; `others`
    are split along their rows alongside.
    """
    n, d = x.shape
    step = max(1, _BLOCK // d)
    out_buf = x.new_empty(min(step, n), d)
    splits = (t.split(step) for t in (x, keep.view(torch.uint8), *others))
    for xb, kb, *rest in zip(*splits):
        k = xb.shape[0]
        yield xb, kb, out_buf if k == step else out_buf[:k], *rest


def _masked_mm(x: Tensor, keep: Tensor, rhs: Tensor) -> Tensor:
    """(keep * x) @ rhs for x (N, in), keep (N, in) bool, rhs (in, r): (N, r)."""
    if x.numel() <= _BLOCK:  # one block: the plain product costs less host time
        return (x * keep) @ rhs
    out = x.new_empty(x.shape[0], rhs.shape[1])
    for xb, mask, buf, ob in _row_blocks(x, keep, out):
        torch.mm(torch.mul(xb, mask, out=buf), rhs, out=ob)
    return out


def _masked_grads(
    u: Tensor, A: Tensor, x: Tensor, keep: Tensor, need_x: bool, need_a: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(u A) * keep (N, in) and u^T (keep * x) (r, in), each None when not needed.

    u: (N, r), A: (r, in), x and keep: (N, in). On the CPU both products take their mask in one
    pass over the row blocks (see `_BLOCK`).
    """
    term = u @ A if need_x else None
    if x.device.type in _FUSED_DROPOUT_DEVICES or x.numel() <= _BLOCK:
        grad_a = u.t() @ (x * keep) if need_a else None
        return (None if term is None else term.mul_(keep)), grad_a
    grad_a = x.new_zeros(u.shape[1], x.shape[1]) if need_a else None
    for xb, kb, buf, ub, *tb in _row_blocks(x, keep, u, *([] if term is None else [term])):
        if tb:
            tb[0].mul_(kb)
        if grad_a is not None:
            grad_a.addmm_(ub.t(), torch.mul(xb, kb, out=buf))
    return term, grad_a


# Devices where PyTorch's own fused dropout kernel (`native_dropout`: the dropped, scaled x and
# its boolean mask in one pass, from the global generator) is cheaper than drawing
# 16-bit masks: random numbers cost little there, a kernel launch more.
_FUSED_DROPOUT_DEVICES = ("cuda",)


def _dropped_product(
    x: Tensor, A: Tensor, s: float, p: float, seed: int | None
) -> tuple[Tensor, Tensor, float]:
    """(h, keep, d) for 2D x: h = s drop(x) A^T (N, r), keep the boolean mask, d = 1 / (1 - p).

    On CUDA, `native_dropout` gives the dropped, scaled x and the mask in one pass, from the
    global generator; on the CPU the mask comes from `dropout_keep` (p' to 2**-16,
    d = 1 / (1 - p')) and is applied block by block as the product is taken.
    """
    if x.device.type in _FUSED_DROPOUT_DEVICES:
        x_in, keep = torch.native_dropout(x, p, True)
        return (x_in @ A.t()).mul_(s), keep, 1.0 / (1.0 - p)
    keep = dropout_keep(x.shape, p, seed, x.device)
    d = 1.0 / (1.0 - _keep_threshold(p)[1])
    return _masked_mm(x, keep, A.t()).mul_(s * d), keep, d


def dropout_mask(
    shape: tuple[int, ...], p: float, seed: int | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The fused op's inverted-dropout mask: 0 with probability p, else 1 / (1 - p)."""
    _, p_exact = _keep_threshold(p)
    return dropout_keep(shape, p, seed, device).to(dtype).div_(1.0 - p_exact)


_MERGE_DTYPES = (torch.float32, torch.float64)


def _merge_allowed(weight: Tensor, dropout: tuple[float, ...]) -> bool:
    """W' is exact only without dropout and in a wide dtype (see above)."""
    return not any(dropout) and weight.dtype in _MERGE_DTYPES


def merge_pays(n_tokens: int, weight: Tensor, dropout: tuple[float, ...]) -> bool:
    """Whether folding the adapters into W' beats adding their thin products (see above)."""
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
    """The fused op's non-tensor arguments, passed to the autograd node as one object."""

    scales: tuple[float, ...]
    dropout: tuple[float, ...]
    seed: int | None
    transposed: bool
    merge: bool


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
    scales, dropout, seed, transposed, merge = plan
    n = len(scales)
    if merge:
        w_t = _merged(weight, factors, scales, transposed)
        w_t = w_t if transposed else w_t.t()
        y = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
        hs = [F.linear(x, factors[2 * i]).mul_(s) for i, s in enumerate(scales)] if keep else []
        return y, hs, [None] * n, [1.0] * n
    y = None
    hs, masks, dscales = [], [], []
    for i, (s, p) in enumerate(zip(scales, dropout)):
        A, B = factors[2 * i], factors[2 * i + 1]
        if p == 0:  # h: (N, r), s folded in: grad_B = (h^T g)^T
            h, mask, d = F.linear(x, A).mul_(s), None, 1.0
        else:
            h, mask, d = _dropped_product(x, A, s, p, None if seed is None else seed + i)
        if y is None:
            y = F.linear(h, B, bias)
        else:
            y.addmm_(h, B.t())
        hs.append(h)
        masks.append(mask)
        dscales.append(d)
    w_t = weight if transposed else weight.t()  # (in, out), a view either way
    if y is None:
        y = x @ w_t if bias is None else torch.addmm(bias, x, w_t)
    else:
        y.addmm_(x, w_t)
    return y, hs, masks, dscales


class _FusedLoraLinear(torch.autograd.Function):
    """Autograd node of `fused_lora_linear` on 2D inputs (see the module comment)."""

    @staticmethod
    def forward(ctx, x, weight, bias, plan, *factors):  # noqa: ANN001
        y, hs, masks, dscales = _fused_forward(x, weight, bias, factors, plan)
        ctx.save_for_backward(x, weight, *factors, *hs, *masks)
        ctx.plan, ctx.dscales, ctx.has_bias = plan, dscales, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        x, weight, *rest = ctx.saved_tensors
        plan = ctx.plan
        n = len(plan.scales)
        factors, hs, masks = rest[: 2 * n], rest[2 * n : 3 * n], rest[3 * n :]
        need = ctx.needs_input_grad
        need_x, need_w, need_b = need[0], need[1], need[2] and ctx.has_bias
        if not g.is_contiguous():
            g = g.contiguous()
        grad_x = None
        grad_factors: list[Tensor | None] = []
        for i, (s, d) in enumerate(zip(plan.scales, ctx.dscales)):
            A, B, h, keep = factors[2 * i], factors[2 * i + 1], hs[i], masks[i]
            need_a, need_bb = need[4 + 2 * i], need[5 + 2 * i]
            grad_b_a = (h.t() @ g).t() if need_bb else None  # (out, r), while g is in cache
            if plan.merge and not need_a:
                grad_factors += [None, grad_b_a]
                continue
            u = (g @ B).mul_(s * d)  # (N, r) = s' g B
            grad_a = None
            if keep is not None:  # dropout: never merged
                term, grad_a = _masked_grads(u, A, x, keep, need_x, need_a)
                if term is not None:
                    grad_x = term if grad_x is None else grad_x.add_(term)
            else:
                if need_x and not plan.merge:
                    grad_x = u @ A if grad_x is None else grad_x.addmm_(u, A)
                if need_a:
                    grad_a = u.t() @ x  # (r, in)
            grad_factors += [grad_a, grad_b_a]
        if need_x:
            w = _merged(weight, factors, plan.scales, plan.transposed) if plan.merge else weight
            w = w.t() if plan.transposed else w  # (out, in)
            grad_x = g @ w if grad_x is None else grad_x.addmm_(g, w)
        grad_w = None
        if need_w:
            grad_w = x.t() @ g if plan.transposed else g.t() @ x
        grad_b = g.sum(0) if need_b else None
        return grad_x, grad_w, grad_b, None, *grad_factors


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
    Computes in x's dtype (adapter factors are cast to it: a tiny copy, never one of x);
    under autocast, in autocast's dtype.
    Gradients flow to x, A, B, and to weight and bias only when they require grad.
    `merge` folds the adapters into a transient W' (see above); None decides by `merge_pays`.
    """
    if dropout is None:
        dropout = (0.0,) * len(scales)
    assert len(lora_A) == len(lora_B) == len(scales) == len(dropout)
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None and x.is_floating_point():
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
                merge=merge,
            )
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])  # a view for contiguous x: nothing copied
    factors: list[Tensor] = []
    graph = x2.requires_grad or weight.requires_grad
    for A, B in zip(lora_A, lora_B):
        factors += (A if A.dtype is dtype else A.to(dtype), B if B.dtype is dtype else B.to(dtype))
        graph = graph or A.requires_grad or B.requires_grad
    if bias is not None:
        graph = graph or bias.requires_grad
        if bias.dtype is not dtype:
            bias = bias.to(dtype)
    graph = graph and torch.is_grad_enabled()
    scales = tuple(map(float, scales))
    dropout = tuple(map(float, dropout))
    if merge is None:
        merge = merge_pays(x2.shape[0], weight, dropout)
    merge = merge and weight.dtype == dtype and _merge_allowed(weight, dropout)
    plan = _Plan(scales, dropout, seed, transposed, merge)
    if graph:
        y = _FusedLoraLinear.apply(x2, weight, bias, plan, *factors)
    else:  # inference: the same kernels, and no autograd node to keep anything alive
        y, *_ = _fused_forward(x2, weight, bias, tuple(factors), plan, keep=False)
    return y.view(*x.shape[:-1], y.shape[-1])
