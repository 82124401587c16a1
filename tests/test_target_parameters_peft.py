"""`target_parameters` (LoRA on raw 2-D / 3-D parameters) against the real `peft` package:
files both ways with the same keys, outputs, merges and gradients."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from moe_models import RawNet, moe_tokens, raw_features, tiny_gpt_oss, tiny_mixtral
from peft_cross import model_output, nudge_trainable
from safetensors import safe_open
from torch import Tensor, nn

import lorakit
from lorakit.checkpoint.parameter_keys import parameter_prefixes
from lorakit.layers.parameter import ParamLoraLayer

ATOL = 1e-5
EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    parameters: tuple[str, ...]
    x: Callable[[], Tensor]
    targets: tuple[str, ...] = ()
    rank: int = 4
    both: dict = field(default_factory=dict)  # options both libraries take, in lorakit's names


CASES = [
    Case("mixtral-experts", tiny_mixtral, EXPERTS, moe_tokens),
    Case("mixtral-down-and-attention", tiny_mixtral, ("experts.down_proj",), moe_tokens,
         targets=("q_proj", "v_proj"), rank=2),
    Case("mixtral-rslora-pattern", tiny_mixtral, EXPERTS, moe_tokens,
         both={"use_rslora": True, "rank_pattern": {"layers.1.mlp.experts.down_proj": 2},
               "alpha_pattern": {"gate_up_proj": 3}}),
    Case("gpt-oss-transposed", tiny_gpt_oss, EXPERTS, moe_tokens, rank=3),
    Case("raw-2d", RawNet, ("block.proj",), raw_features),
    Case("raw-2d-and-3d", RawNet, ("proj", "stack"), raw_features, targets=("head",), rank=2),
]  # fmt: skip


def _peft_config(case: Case) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=case.rank, lora_alpha=2 * case.rank, target_modules=list(case.targets),
        target_parameters=list(case.parameters), **case.both,
    )  # fmt: skip


def _lorakit_config(case: Case) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=case.rank, alpha=2 * case.rank, targets=case.targets,
                              target_parameters=case.parameters, **case.both)  # fmt: skip


def _peft_model(case: Case) -> nn.Module:
    model = peft.get_peft_model(case.make(), _peft_config(case))
    nudge_trainable(model, seed=5)
    return model


def _keys(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_files_have_peft_keys_and_shapes(case: Case, tmp_path: Path) -> None:
    _peft_model(case).save_pretrained(tmp_path / "peft")
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    lorakit.save_adapter(model, tmp_path / "ours")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == list(case.parameters)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case).eval()
    ref.save_pretrained(tmp_path)
    x = case.x()
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(ref, x), atol=1e-3)
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        merged_ref = copy.deepcopy(ref).merge_and_unload()
        merged = lorakit.merge_and_unload(copy.deepcopy(model))
        assert type(merged.get_submodule(_holder(case))) is type(case.make().get_submodule(
            _holder(case)))  # fmt: skip
        torch.testing.assert_close(
            model_output(merged, x), model_output(merged_ref, x), rtol=0, atol=ATOL
        )
        want = merged_ref.state_dict()
        assert merged.state_dict().keys() == want.keys()
        for name, weight in merged.state_dict().items():
            torch.testing.assert_close(weight, want[name], rtol=0, atol=ATOL, msg=name)


def _holder(case: Case) -> str:
    return "block" if case.make is RawNet else "model.layers.0.mlp.experts"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_file_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    nudge_trainable(model, seed=6)
    lorakit.save_adapter(model, tmp_path)
    x = case.x()
    ref = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(model, x), atol=1e-3)
        torch.testing.assert_close(model_output(ref, x), model_output(model, x), rtol=0, atol=ATOL)
        ref.merge_adapter()
        lorakit.merge(model)
        torch.testing.assert_close(model_output(ref, x), model_output(model, x), rtol=0, atol=ATOL)


def _peft_names(model: nn.Module) -> dict[str, str]:
    """lorakit's trainable name -> PEFT's, for a model lorakit adapted."""
    layers = list(lorakit.lora_layers(model))
    prefixes = parameter_prefixes(layers)
    names = {}
    for path, layer in layers:
        for factor in ("A", "B"):
            ours = f"{path}.lora.default.lora_{factor}"
            peft_path = prefixes[path] if isinstance(layer, ParamLoraLayer) else path
            names[ours] = f"base_model.model.{peft_path}.lora_{factor}.default.weight"
    return names


def _grads(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    out = model_output(model, x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=lambda c: c.id)
def test_gradients_match_peft_and_reach_only_the_factors(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case).train()
    ref.save_pretrained(tmp_path)
    model = lorakit.from_pretrained(case.make(), tmp_path).train()
    x = case.x()
    want = _grads(ref, x)
    got = _grads(model, x)
    names = _peft_names(model)
    assert {n for n, g in got.items() if g is not None} == names.keys()
    assert {n for n, g in want.items() if g is not None} == set(names.values())
    for ours, theirs in names.items():
        torch.testing.assert_close(got[ours], want[theirs], rtol=1e-4, atol=ATOL, msg=ours)
