"""The singular values of a saved adapter's deltas, per layer: a table, JSON and a PNG plot.

What `lorakit inspect PATH --spectrum [--plot FILE]` shows. The effective rank at a share of
energy is the fewest singular values holding that share of ||s B A||_F²: far below the LoRA
rank, the adapter would compress well (`lorakit compress`).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from .errors import MissingDependencyError
from .saved_factors import read_factors
from .spectrum import ENERGIES, LayerSpectrum, layer_spectrum
from .table import table_lines

SHOWN = 6  # singular values printed per layer in the text table


def adapter_spectrum(
    path: str | PathLike, adapter_name: str = "default", *, allow_pickle: bool = False
) -> list[LayerSpectrum]:
    """The spectrum of each layer's delta s * B A in the adapter at `path`, in key order.

    Raises:
        CheckpointError: the folder is missing or damaged.
    """
    saved = read_factors(path, adapter_name, allow_pickle=allow_pickle)
    return [layer_spectrum(layer.module, *saved.factors(layer), layer.scale)
            for layer in saved.layers]  # fmt: skip


def format_spectrum(spectra: list[LayerSpectrum]) -> str:
    """A table: module, rank, effective ranks at 90% / 99% energy, the top singular values."""
    shares = [f"rank@{round(e * 100)}%" for e in ENERGIES]
    rows = [("module", "rank", *shares, f"singular values (top {SHOWN})")]
    for s in spectra:
        values = " ".join(f"{v:.3g}" for v in s.singular_values[:SHOWN])
        ranks = [str(s.effective_rank(e)) for e in ENERGIES]
        rows.append((s.module, str(s.rank), *ranks, values))
    return "\n".join(line.rstrip() for line in table_lines(rows))


def plot_spectrum(spectra: list[LayerSpectrum], file: str | PathLike) -> Path:
    """Draw singular values (left, relative to each layer's largest) and the cumulative share
    of energy (right) per layer into the PNG `file`.

    Raises:
        MissingDependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no backend or display needed
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MissingDependencyError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib"
        ) from None
    fig = Figure(figsize=(10, 4), dpi=100)
    left, right = fig.subplots(1, 2)
    for s in spectra:
        top = s.singular_values[0] if s.singular_values and s.singular_values[0] > 0 else 1.0
        index = range(1, len(s.singular_values) + 1)
        left.semilogy(index, [max(v / top, 1e-12) for v in s.singular_values], ".-")
        squares = [v * v for v in s.singular_values]
        total = sum(squares) or 1.0
        shares = [sum(squares[: i + 1]) / total for i in range(len(squares))]
        right.plot(index, shares, ".-", label=s.module)
    left.set(xlabel="index", ylabel="singular value / largest", title="singular values")
    right.set(xlabel="rank", ylabel="share of ||delta||²", title="energy captured")
    for axes in (left, right):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for energy in ENERGIES:
        right.axhline(energy, color="grey", linewidth=0.5, linestyle="--")
    if len(spectra) <= 12:
        right.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(file, format="png")
    return Path(file)
