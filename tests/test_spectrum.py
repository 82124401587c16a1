"""Singular values of LoRA deltas from their factors, and `lorakit inspect --spectrum`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomise_lora, tiny_llama

import lorakit
from lorakit.cli import main
from lorakit.spectrum import effective_rank, factor_svd, relative_error
from lorakit.spectrum_report import adapter_spectrum

SHAPES = [  # (A shape, B shape): linear, rank above a side, conv2d, embedding-like
    ((4, 7), (5, 4)),
    ((6, 3), (5, 6)),
    ((3, 2, 3, 3), (4, 3, 1, 1)),
    ((2, 50), (8, 2)),
]


@pytest.mark.parametrize("a_shape, b_shape", SHAPES, ids=["linear", "wide", "conv2d", "emb"])
def test_factor_svd_equals_dense_svd(a_shape: tuple, b_shape: tuple) -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(a_shape, generator=g), torch.randn(b_shape, generator=g)
    delta = lorakit.delta_weight(A.double(), B.double(), 1.5).flatten(1)
    svd = factor_svd(A, B, 1.5)
    dense = torch.linalg.svdvals(delta)
    torch.testing.assert_close(svd.S, dense[: len(svd.S)], rtol=0, atol=1e-10)
    assert float(dense[len(svd.S) :].abs().sum()) < 1e-10  # nothing left out
    rebuilt = (svd.U * svd.S) @ svd.Vh
    torch.testing.assert_close(rebuilt, delta, rtol=0, atol=1e-10)


EFFECTIVE = [
    ((3.0, 0.0, 0.0), 0.9, 1),
    ((1.0, 1.0, 1.0, 1.0), 0.9, 4),
    ((1.0, 1.0, 1.0, 1.0), 0.5, 2),
    ((3.0, 1.0), 0.9, 1),  # 9 / 10 is exactly 90%
    ((3.0, 1.0), 0.99, 2),
    ((0.0, 0.0), 0.9, 0),
]


@pytest.mark.parametrize("values, energy, expected", EFFECTIVE)
def test_effective_rank(values: tuple, energy: float, expected: int) -> None:
    assert effective_rank(torch.tensor(values), energy) == expected


@pytest.mark.parametrize(
    "values, rank, expected",
    [((3.0, 4.0), 1, 0.8), ((3.0, 4.0), 2, 0.0), ((2.0,), 0, 1.0), ((0.0, 0.0), 1, 0.0)],
)
def test_relative_error(values: tuple, rank: int, expected: float) -> None:
    assert relative_error(torch.tensor(values), rank) == pytest.approx(expected)


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A saved adapter whose q_proj deltas have true rank 2 (rank 4 factors)."""
    model = tiny_llama()
    config = lorakit.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens"))
    lorakit.inject(model, config)
    randomise_lora(model)
    for path, layer in lorakit.lora_layers(model):
        if path.endswith("q_proj"):
            with torch.no_grad():
                layer.lora["default"].lora_B[:, 2:] = 0
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_adapter_spectrum_matches_the_model(adapter) -> None:
    folder, model = adapter
    spectra = {s.module: s for s in adapter_spectrum(folder)}
    layers = dict(lorakit.lora_layers(model))
    assert set(spectra) == set(layers)
    for path, layer in layers.items():
        dense = torch.linalg.svdvals(layer.delta_weight("default").detach().double().flatten(1))
        got = torch.tensor(spectra[path].singular_values, dtype=torch.float64)
        torch.testing.assert_close(got, dense[: len(got)], rtol=0, atol=1e-6)
        assert spectra[path].effective_rank(0.99) == (2 if path.endswith("q_proj") else 4)


def test_cli_spectrum_table_and_json(adapter, capsys) -> None:
    folder, _ = adapter
    assert main(["inspect", str(folder), "--spectrum"]) == 0
    out = capsys.readouterr().out
    assert "rank@90%" in out and "rank@99%" in out
    spectrum_table = out.split("spectrum of s * B A per layer")[1]
    row = next(line for line in spectrum_table.splitlines()
               if line.startswith("model.layers.0.self_attn.q_proj"))  # fmt: skip
    assert row.split()[1] == "4" and row.split()[3] == "2"  # rank 4, rank@99% 2

    assert main(["inspect", str(folder), "--spectrum", "--json"]) == 0
    spectrum = json.loads(capsys.readouterr().out)["spectrum"]
    assert {"module", "rank", "rank_90", "rank_99", "singular_values"} <= set(spectrum[0])
    assert len(spectrum) == 5


def test_cli_plot_writes_a_png(adapter, tmp_path: Path, capsys) -> None:
    folder, _ = adapter
    assert main(["inspect", str(folder), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank@99%" in capsys.readouterr().out  # --plot implies --spectrum


def test_cli_plot_without_matplotlib_names_the_package(adapter, tmp_path: Path, capsys,
                                                       monkeypatch) -> None:  # fmt: skip
    folder, _ = adapter
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert main(["inspect", str(folder), "--plot", str(tmp_path / "s.png")]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
