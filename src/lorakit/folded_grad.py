"""grad x and the adapters' u = g B from one GEMM, when the backward folds W' anyway.

When the fused path folds the adapters into a transient W' = W + sum_a s_a B_a A_a
(`lorakit.fused.merge_pays`), the backward takes grad x = g W' with one big GEMM over the
output gradient g (N, out), and each adapter's u_a = g B_a (N, r_a), which grad A_a
needs, with a thin GEMM: one more pass over g each, at a thin GEMM's poor speed. Both read
g, so one GEMM gives them together:

    g [W' | B_1 | ... | B_n] = [grad x | u_1 | ... | u_n]     (N, in + R)

The r_a extra columns cost r_a / in of the big GEMM's work (on one CPU core, N 2048, rank 8:
the backward's GEMMs of a q-sized layer 14.2 -> 12.8 ms, a gate-sized one 48 -> 42 ms).
The operand (out, in + R) is written in place: W into its first `in` columns, then each
s_a B_a A_a added there by a GEMM that writes the strided block directly, and B_a beside
it. grad x and the u_a are column views of the result (row stride in + R): autograd
and the GEMMs downstream take strided tensors as they are, so nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _folded_operand(
    weight: Tensor, factors: Sequence[Tensor], scales: Sequence[float], transposed: bool,
    u_scale: float,
) -> Tensor:  # fmt: skip
    """[W' | c B_1 | ... | c B_n] (out, in + R), W' = W + sum_a s_a B_a A_a, c = u_scale."""
    w = weight.t() if transposed else weight  # (out, in)
    n_out, n_in = w.shape
    ranks = [factors[2 * i].shape[0] for i in range(len(scales))]
    operand = torch.empty(n_out, n_in + sum(ranks), dtype=w.dtype, device=w.device)
    merged = operand[:, :n_in]
    merged.copy_(w)
    col = n_in
    for i, (s, r) in enumerate(zip(scales, ranks)):
        A, B = factors[2 * i], factors[2 * i + 1]
        merged.addmm_(B, A, alpha=s)
        torch.mul(B, u_scale, out=operand[:, col : col + r])
        col += r
    return operand


def folded_grads(
    g: Tensor, weight: Tensor, factors: Sequence[Tensor], scales: Sequence[float],
    transposed: bool, u_scale: float = 1.0,
) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """(grad x = g W', [u_a = c g B_a]) for g (N, out), from one GEMM (module docstring);
    c = u_scale (1: the fused node scales u itself; s: a layer node's grad h).

    factors: A_1, B_1, A_2, B_2, ... in g's dtype; weight (out, in), or (in, out) when
    `transposed`. Returns strided views of one (N, in + R) tensor.
    """
    operand = _folded_operand(weight, factors, scales, transposed, u_scale)
    result = g @ operand
    n_in = weight.shape[0] if transposed else weight.shape[1]
    grad_x = result[:, :n_in]
    us, col = [], n_in
    for i in range(len(scales)):
        r = factors[2 * i].shape[0]
        us.append(result[:, col : col + r])
        col += r
    return grad_x, us
