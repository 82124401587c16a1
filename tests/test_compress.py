"""`lorakit.compress`, `compress_adapter` and `lorakit compress`: truncated SVD of each delta."""

from __future__ import annotations

import re
from pathlib import Path

import peft
import pytest
import torch
from conftest import VOCAB, randomise_lora, tiny_llama, tiny_mlp
from torch import nn

import lorakit
from lorakit.cli import main

ATOL = 1e-5
CONFIG = {"rank": 4, "alpha": 8.0, "targets": ("q_proj", "v_proj", "embed_tokens"),
          "rank_pattern": {"v_proj": 2}}  # fmt: skip


def _tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


def _adapted(**overrides: object) -> nn.Module:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(**{**CONFIG, **overrides}))
    randomise_lora(model)
    return model


def _deltas(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name).detach().double()
            for path, layer in lorakit.lora_layers(model) if name in layer.lora}  # fmt: skip


@pytest.mark.parametrize("rank", [4, 6])
def test_exact_when_rank_covers_the_delta(rank: int) -> None:
    model = _adapted()
    before, logits = _deltas(model), _run(model)
    report = lorakit.compress(model, "default", rank)
    assert {r.module: (r.rank_before, r.rank) for r in report} == {
        path: (layer.lora["default"].rank,) * 2 for path, layer in lorakit.lora_layers(model)
    }
    assert all(r.relative_error == 0.0 for r in report)
    for path, delta in _deltas(model).items():
        torch.testing.assert_close(delta, before[path], rtol=0, atol=1e-6)
    torch.testing.assert_close(_run(model), logits, rtol=0, atol=ATOL)
    assert lorakit.active_adapters(model) == ("default",)


def test_exact_when_the_true_rank_is_lower() -> None:
    model = _adapted(targets=("q_proj",), rank_pattern={})
    for _, layer in lorakit.lora_layers(model):
        with torch.no_grad():
            layer.lora["default"].lora_B[:, 2:] = 0  # rank 4 factors, rank 2 delta
    before = _deltas(model)
    report = lorakit.compress(model, "default", 2)
    assert all(r.rank_before == 4 and r.rank == 2 and r.relative_error < 1e-7 for r in report)
    for path, delta in _deltas(model).items():
        torch.testing.assert_close(delta, before[path], rtol=0, atol=1e-6)


def test_truncation_is_the_best_approximation_and_reports_its_error() -> None:
    model = _adapted()
    before = _deltas(model)
    report = {r.module: r for r in lorakit.compress(model, "default", 1)}
    for path, delta in _deltas(model).items():
        U, S, Vh = torch.linalg.svd(before[path].flatten(1), full_matrices=False)
        best = (U[:, :1] * S[:1]) @ Vh[:1]
        torch.testing.assert_close(delta.flatten(1), best, rtol=0, atol=1e-6)
        expected = float(S[1:].square().sum().sqrt() / S.square().sum().sqrt())
        assert report[path].rank == 1 and report[path].relative_error == pytest.approx(expected)
        assert report[path].relative_error > 0.1  # a real cut


def test_compress_adapter_folder_loads_in_peft_and_lorakit(tmp_path: Path) -> None:
    model = _adapted()
    lorakit.save_adapter(model, tmp_path / "full")
    report = lorakit.compress_adapter(tmp_path / "full", 3, tmp_path / "small")
    assert {r.module.rsplit(".", 1)[-1]: r.rank for r in report} == {
        "q_proj": 3, "v_proj": 2, "embed_tokens": 3
    }  # fmt: skip
    in_memory = lorakit.compress(model, "default", 3)
    assert sorted((r.module, r.rank, round(r.relative_error, 6)) for r in in_memory) == sorted(
        (r.module, r.rank, round(r.relative_error, 6)) for r in report
    )
    want = _run(model)

    ours = lorakit.from_pretrained(tiny_llama(), tmp_path / "small")
    torch.testing.assert_close(_run(ours), want, rtol=0, atol=ATOL)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "small").eval()
    torch.testing.assert_close(_run(theirs), want, rtol=0, atol=ATOL)


def test_compressed_model_adapter_saves_and_reloads(tmp_path: Path) -> None:
    model = _adapted()
    lorakit.compress(model, "default", 3)
    lorakit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_run(theirs), _run(model), rtol=0, atol=ATOL)


def test_cli_prints_per_layer_errors(tmp_path: Path, capsys) -> None:
    lorakit.save_adapter(_adapted(), tmp_path / "full")
    args = ["compress", str(tmp_path / "full"), "--rank", "1", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "relative error" in out and "model.layers.1.self_attn.v_proj" in out
    assert f"wrote {tmp_path / 'out'}: 5 layers" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


CLI_ERRORS = [
    (["--rank", "0"], "rank must be a positive integer, got 0"),
    (["--rank", "33"], r"rank=33 is above the size of layer '.*': its delta is 32 x 32"),
]


@pytest.mark.parametrize("extra, message", CLI_ERRORS, ids=["zero", "above-size"])
def test_cli_errors(extra: list[str], message: str, tmp_path: Path, capsys) -> None:
    model = _adapted(targets=("q_proj",), rank_pattern={})
    lorakit.save_adapter(model, tmp_path / "full")
    assert main(["compress", str(tmp_path / "full"), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorakit compress: error: ")
    assert re.search(message, err)
    assert not (tmp_path / "o").exists()


def _mlp_with(name: str, **config: object) -> nn.Module:
    model = tiny_mlp()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("fc1",), **config), name)
    return model


def _merged() -> nn.Module:
    model = _mlp_with("a")
    lorakit.merge(model)
    return model


MODEL_ERRORS = [
    ("unknown", lambda: _mlp_with("a"), "zz", 1, lorakit.AdapterError, "unknown adapter"),
    ("rank-zero", lambda: _mlp_with("a"), "a", 0, lorakit.ConfigError, "got 0"),
    ("rank-above", lambda: _mlp_with("a"), "a", 9, lorakit.ConfigError,
     r"rank=9 is above the size of layer 'fc1': its delta is 16 x 8, so rank <= 8"),
    ("merged", _merged, "a", 1, lorakit.AdapterError, "'a' is merged into 'fc1'; unmerge"),
    ("dora", lambda: _mlp_with("d", use_dora=True), "d", 1, lorakit.ConfigError,
     r"adapter 'd' is DoRA \(use_dora=True\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make, name, rank, error, match",
    [e[1:] for e in MODEL_ERRORS],
    ids=[e[0] for e in MODEL_ERRORS],
)
def test_model_errors(make, name: str, rank: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        lorakit.compress(make(), name, rank)


def test_dora_folder_is_refused(tmp_path: Path) -> None:
    lorakit.save_adapter(_mlp_with("default", use_dora=True), tmp_path / "d")
    with pytest.raises(lorakit.ConfigError, match="use_dora=True; compress works on plain"):
        lorakit.compress_adapter(tmp_path / "d", 1, tmp_path / "o")


def test_compress_keeps_names_order_and_active_set() -> None:
    model = tiny_mlp()
    for name in ("a", "b", "c"):
        lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("fc1", "fc2")), name)
    randomise_lora(model)
    lorakit.set_active(model, ["a", "c"])
    lorakit.compress(model, "a", 2)
    lorakit.compress(model, "b", 2)
    assert lorakit.adapter_names(model) == ("a", "b", "c")
    assert lorakit.active_adapters(model) == ("a", "c")
    trainable = {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a", "c"}
    assert all(layer.lora["a"].rank == 2 and layer.lora["c"].rank == 4
               for _, layer in lorakit.lora_layers(model))  # fmt: skip
