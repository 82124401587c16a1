"""The fused op's CPU dropout masks: boolean keep-masks from 16-bit draws, applied in blocks.

A mask comes from the global generator, as nn.Dropout's, as four 16-bit draws per 64-bit
word, and is kept as booleans (one byte per entry, where a dropped copy of x costs two or
four). It is applied block by block: k * x is never materialised (see `_BLOCK`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

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


def dropout_mask(
    shape: tuple[int, ...], p: float, seed: int | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The fused op's inverted-dropout mask: 0 with probability p, else 1 / (1 - p)."""
    _, p_exact = _keep_threshold(p)
    return dropout_keep(shape, p, seed, device).to(dtype).div_(1.0 - p_exact)


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


def dropped_product(
    x: Tensor, A: Tensor, s: float, p: float, seed: int | None
) -> tuple[Tensor, Tensor, float]:
    """(h, keep, d) for 2D x: h = s drop(x) A^T (N, r), keep the boolean mask, d = 1 / (1 - p').

    The mask comes from `dropout_keep` (p' is p to 2**-16) and is applied block by block as
    the product is taken.
    """
    keep = dropout_keep(x.shape, p, seed, x.device)
    d = 1.0 / (1.0 - _keep_threshold(p)[1])
    return _masked_mm(x, keep, A.t()).mul_(s * d), keep, d


def masked_grads(
    u: Tensor, A: Tensor, x: Tensor, keep: Tensor, need_x: bool, need_a: bool, blocks: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(u A) * keep (N, in) and u^T (keep * x) (r, in), each None when not needed.

    u: (N, r), A: (r, in), x and keep: (N, in). With `blocks` (on the CPU) both products take
    their mask in one pass over the row blocks (see `_BLOCK`); without, over whole tensors.
    """
    term = u @ A if need_x else None
    if not blocks or x.numel() <= _BLOCK:
        grad_a = u.t() @ (x * keep) if need_a else None
        return (None if term is None else term.mul_(keep)), grad_a
    grad_a = x.new_zeros(u.shape[1], x.shape[1]) if need_a else None
    for xb, kb, buf, ub, *tb in _row_blocks(x, keep, u, *([] if term is None else [term])):
        if tb:
            tb[0].mul_(kb)
        if grad_a is not None:
            grad_a.addmm_(ub.t(), torch.mul(xb, kb, out=buf))
    return term, grad_a
