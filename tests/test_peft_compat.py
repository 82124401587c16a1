"""Adapter files exchanged with the real `peft` package, both directions, outputs equal."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from conftest import VOCAB, randomise_lora, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import lorakit

ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One adapter set-up, written once for PEFT and once for lorakit."""

    id: str
    make: Callable[[], nn.Module]
    peft: dict
    lorakit: dict
    extra: dict = field(default_factory=dict)  # PEFT-only options (task_type, fan_in_fan_out)


LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [
    Case("llama", tiny_llama, {"target_modules": list(LLAMA_ALL)}, {"targets": LLAMA_ALL}),
    Case(
        "gpt2-conv1d",
        tiny_gpt2,
        {"target_modules": ["c_attn", "c_proj", "c_fc"]},
        {"targets": ("c_attn", "c_proj", "c_fc")},
        {"fan_in_fan_out": True},
    ),
    Case(
        "bert-seq-cls",
        tiny_bert,
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        {"targets": ("query", "value"), "modules_to_save": ("classifier",)},
        {"task_type": "SEQ_CLS"},
    ),
    Case(
        "bert-bias-lora-only",
        tiny_bert,
        {"target_modules": ["query", "dense"], "bias": "lora_only"},
        {"targets": ("query", "dense"), "bias": "lora_only"},
    ),
    Case(
        "embedding",
        tiny_llama,
        {"target_modules": ["embed_tokens", "q_proj"]},
        {"targets": ("embed_tokens", "q_proj")},
    ),
    Case(
        "rank-alpha-pattern",
        tiny_llama,
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
            "alpha_pattern": {"v_proj": 3.0},
        },
        {
            "targets": ("q_proj", "v_proj", "down_proj"),
            "rank_pattern": {"down_proj": 2, "layers.1.self_attn.q_proj": 6},
            "alpha_pattern": {"v_proj": 3.0},
        },
    ),
    Case(
        "rslora-regex",
        tiny_llama,
        {"target_modules": r".*\.(q|v)_proj", "use_rslora": True},
        {"targets": r".*\.(q|v)_proj", "use_rslora": True},
    ),
    Case(
        "all-linear",
        tiny_gpt2,
        {"target_modules": "all-linear"},
        {"targets": "all-linear"},
        {"fan_in_fan_out": True},
    ),
]


def _tokens() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens()).logits


def _nudge_trainable(model: nn.Module, seed: int) -> None:
    """What training would do: every trainable tensor random, so nothing matches by luck."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_adapter_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, **case.peft, **case.extra)
    peft_model = peft.get_peft_model(case.make(), config)
    _nudge_trainable(peft_model, seed=5)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)

    base = case.make()
    assert not torch.allclose(_run(base), _run(peft_model), atol=1e-3)  # the adapter matters
    model = lorakit.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_run(model), _run(peft_model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_adapter_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = case.make()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, alpha=8, **case.lorakit))
    randomise_lora(model)
    _nudge_trainable(model, seed=6)
    lorakit.save_adapter(model, tmp_path)

    base = case.make()
    assert not torch.allclose(_run(base), _run(model), atol=1e-3)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_run(peft_model), _run(model), rtol=0, atol=ATOL)


def test_several_adapters_both_ways(tmp_path: Path) -> None:
    """PEFT's layout for several adapters (subfolders) reads the same in both libraries."""
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    peft_model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    _nudge_trainable(peft_model, seed=1)
    peft_model.set_adapter("second")
    _nudge_trainable(peft_model, seed=2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "second" / "adapter_config.json").is_file()

    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path / "peft")
    lorakit.load_adapter(model, tmp_path / "peft", adapter_name="second")
    for name in ("default", "second"):
        peft_model.set_adapter(name)
        lorakit.set_active(model, name)
        torch.testing.assert_close(_run(model), _run(peft_model), rtol=0, atol=ATOL)

    lorakit.save_adapter(model, tmp_path / "lk")
    lorakit.save_adapter(model, tmp_path / "lk", adapter_name="second")
    again = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lk").eval()
    again.load_adapter(tmp_path / "lk" / "second", adapter_name="second")
    again.set_adapter("second")
    torch.testing.assert_close(_run(again), _run(model), rtol=0, atol=ATOL)


def test_peft_accepts_lorakit_config_without_warnings(tmp_path: Path, recwarn) -> None:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(targets="all-linear"))
    lorakit.save_adapter(model, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, peft.LoraConfig) and config.r == 8
    assert not [w for w in recwarn if "adapter_config" in str(w.message)]
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    # "all-linear" becomes the explicit list of adapted layers (output head excluded), as PEFT does
    assert len(targets) == 2 * len(LLAMA_ALL) and "lm_head" not in targets


def test_legacy_bin_from_peft_with_permission(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    _nudge_trainable(peft_model, seed=3)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(lorakit.CheckpointError, match="allow_pickle"):
        lorakit.from_pretrained(tiny_llama(), tmp_path)
    model = lorakit.from_pretrained(tiny_llama(), tmp_path, allow_pickle=True)
    torch.testing.assert_close(_run(model), _run(peft_model), rtol=0, atol=ATOL)


def test_merge_matches_peft_merge(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    _nudge_trainable(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path)
    merged_peft = copy.deepcopy(peft_model).merge_and_unload().eval()
    merged = lorakit.merge_and_unload(lorakit.from_pretrained(tiny_gpt2(), tmp_path)).eval()
    torch.testing.assert_close(_run(merged), _run(merged_peft), rtol=0, atol=ATOL)


class ConvNet(nn.Module):
    """A Conv2d and a Linear: PEFT's ConvNd layout, A (r, in, k, k) and B (out, r, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("direction", ["peft->lorakit", "lorakit->peft"])
def test_conv2d_both_ways(direction: str, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    if direction == "peft->lorakit":
        source = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=3, target_modules=["conv", "fc"]))
        _nudge_trainable(source, seed=8)
        source.save_pretrained(tmp_path)
        other = lorakit.from_pretrained(ConvNet(), tmp_path)
    else:
        source = ConvNet()
        lorakit.inject(source, lorakit.LoraConfig(rank=3, targets=("conv", "fc")))
        randomise_lora(source)
        lorakit.save_adapter(source, tmp_path)
        other = peft.PeftModel.from_pretrained(ConvNet(), tmp_path)
    with torch.no_grad():
        assert not torch.allclose(ConvNet()(x), source(x), atol=1e-3)
        torch.testing.assert_close(other(x), source(x), rtol=0, atol=ATOL)
