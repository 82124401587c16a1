"""Singular values of LoRA deltas s * B A, found from the factors without forming B A.

With B = Q_b R_b and Aᵀ = Q_a R_a (thin QR), s B A = Q_b (s R_b R_aᵀ) Q_aᵀ, so the SVD of the
small r x r core gives the delta's: O((out + in) r²) work and memory instead of a dense
out x in SVD, which matters for an embedding's vocabulary-wide delta. The math runs in float64:
these are reports and truncations, so they should not add rounding of their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ConfigError
from .functional import ungrouped_B

ENERGIES = (0.9, 0.99)  # shares of ||delta||_F² the effective-rank columns report


@dataclass(frozen=True)
class LowRankSVD:
    """delta = U diag(S) Vh, with U (out, k), S (k,) descending, Vh (k, in * kernel)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B) = (Vh[:rank], U[:, :rank] S[:rank]): the best rank-`rank` approximation,
        scale 1 (PEFT's `add_weighted_adapter` convention)."""
        return self.Vh[:rank], self.U[:, :rank] * self.S[:rank]

    def factors_like(
        self, rank: int, A: Tensor, B: Tensor, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """`factors(rank)` in the layout of LoRA factors A (r, in, *kernel), B (out, r, *ones),
        in `dtype` (default A's)."""
        a, b = self.factors(rank)
        dtype = dtype or A.dtype
        a = a.reshape(rank, *A.shape[1:]).to(dtype)
        return a, b.reshape(B.shape[0], rank, *B.shape[2:]).to(dtype)


def check_rank_fits(rank: int, out: int, size: int, where: str) -> None:
    """Refuse a `rank` above a delta's size (out x size) for the layer `where`."""
    if rank > min(out, size):
        raise ConfigError(
            f"rank={rank} is above the size of layer {where!r}: its delta is {out} x {size}, "
            f"so rank <= {min(out, size)}"
        )


def factor_svd(A: Tensor, B: Tensor, scale: float = 1.0) -> LowRankSVD:
    """The thin SVD of s * B A for LoRA factors A (r, in, *kernel) and B (out, r, *ones) (a
    grouped conv's B (out, r / g, *ones) is expanded: `functional.ungrouped_B`).

    U and Vh are flat: reshape A-like rows with `A.shape[1:]`.
    """
    rank = A.shape[0]
    b = ungrouped_B(B.detach(), rank).reshape(B.shape[0], rank).to(torch.float64)
    a = A.detach().reshape(rank, -1).to(torch.float64)
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return LowRankSVD(q_b @ u, s, vh @ q_a.T)


def relative_error(S: Tensor, rank: int) -> float:
    """||delta - delta_rank||_F / ||delta||_F for singular values S (0 for a zero delta)."""
    energy = S.double().square()
    total = float(energy.sum())
    return math.sqrt(float(energy[rank:].sum()) / total) if total > 0 else 0.0


def effective_rank(S: Tensor, energy: float) -> int:
    """The fewest singular values whose squares hold `energy` of the total (0 for a zero delta)."""
    squares = S.double().square()
    total = float(squares.sum())
    if total == 0:
        return 0
    shares = torch.cumsum(squares, 0) / total
    return min(int(torch.searchsorted(shares, energy - 1e-12)) + 1, len(S))


@dataclass(frozen=True)
class LayerSpectrum:
    """One layer's delta: its LoRA rank, singular values (descending) and effective ranks."""

    module: str
    rank: int
    singular_values: tuple[float, ...]

    def effective_rank(self, energy: float) -> int:
        return effective_rank(torch.tensor(self.singular_values), energy)

    def as_dict(self) -> dict:
        ranks = {f"rank_{round(e * 100)}": self.effective_rank(e) for e in ENERGIES}
        return {"module": self.module, "rank": self.rank, **ranks,
                "singular_values": list(self.singular_values)}  # fmt: skip


def layer_spectrum(module: str, A: Tensor, B: Tensor, scale: float) -> LayerSpectrum:
    """The spectrum of s * B A for the layer at path `module`."""
    values = factor_svd(A, B, scale).S
    return LayerSpectrum(module, A.shape[0], tuple(float(v) for v in values))
