"""DoRA against the real `peft` package: files both ways, outputs, merges and gradients."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from peft_cross import MLP, assert_same_merge, features, model_output, nudge_trainable, tokens
from torch import Tensor, nn

import lorakit

ATOL = 1e-5


class ConvNet(nn.Module):
    """A conv (1d, 2d or 3d) then a Linear: PEFT's conv DoRA, m of shape (1, out, 1, ...)."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4**dims, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _images(dims: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(2, 3, *(4,) * dims, generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    targets: tuple[str, ...]
    x: Callable[[], Tensor]
    rank: int = 4
    extra: dict = field(default_factory=dict)  # PEFT-only options
    both: dict = field(default_factory=dict)  # options both libraries name alike


CASES = [
    Case("linear-bias-and-not", MLP, ("lin1", "lin2"), features),
    Case("linear-rank1", MLP, ("lin1", "lin2"), features, rank=1),
    Case("linear-rslora-bias", MLP, ("lin1", "lin2"), features,
         both={"use_rslora": True, "bias": "lora_only"}),
    Case("gpt2-conv1d", tiny_gpt2, ("c_attn", "c_proj", "c_fc"), tokens, rank=8,
         extra={"fan_in_fan_out": True}),
    Case("llama-embedding", tiny_llama, ("embed_tokens", "q_proj", "down_proj"), tokens),
    Case("conv2d", ConvNet, ("conv", "fc"), _images(2), rank=3),
    Case("conv1d", lambda: ConvNet(1), ("conv",), _images(1), rank=2),
    Case("conv3d", lambda: ConvNet(3), ("conv",), _images(3), rank=2),
]  # fmt: skip


def _peft_model(case: Case, dropout: float = 0.0) -> nn.Module:
    config = peft.LoraConfig(
        r=case.rank, lora_alpha=2 * case.rank, target_modules=list(case.targets), use_dora=True,
        lora_dropout=dropout, **case.extra, **case.both,
    )  # fmt: skip
    model = peft.get_peft_model(case.make(), config)
    nudge_trainable(model, seed=5)
    return model


def _lorakit_config(case: Case) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=case.rank, alpha=2 * case.rank, targets=case.targets,
                              use_dora=True, **case.both)  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_magnitude_starts_as_peft_does(case: Case) -> None:
    config = peft.LoraConfig(
        r=case.rank, lora_alpha=2 * case.rank, use_dora=True, target_modules=list(case.targets),
        **case.extra, **case.both,
    )  # fmt: skip
    ref = peft.get_peft_model(case.make(), config)
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    ours = {n: p for n, p in model.named_parameters() if n.endswith("magnitude")}
    theirs = {_our_name(n): p for n, p in ref.named_parameters() if "magnitude" in n}
    assert ours.keys() == theirs.keys() and ours
    for name, p in ours.items():
        torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_dora_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case).eval()
    ref.save_pretrained(tmp_path)
    x = case.x()
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(ref, x), atol=1e-3)
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        assert_same_merge(ref, model, x, ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_dora_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    nudge_trainable(model, seed=6)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    x = case.x()
    ref = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(model, x), atol=1e-3)
        torch.testing.assert_close(model_output(ref, x), model_output(model, x), rtol=0, atol=ATOL)


def _our_name(peft_name: str) -> str:
    """PEFT's parameter name -> lorakit's, e.g. `base_model.model.lin1.lora_A.default.weight`
    -> `lin1.lora.default.lora_A`."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    name = re.sub(r"\.lora_(?:embedding_)?([AB])\.(\w+)(?:\.weight)?$", r".lora.\2.lora_\1", name)
    return re.sub(r"\.lora_magnitude_vector\.(\w+)\.weight$", r".lora.\1.magnitude", name)


def _grads(model: nn.Module, x: Tensor, rename: Callable[[str], str]) -> dict[str, Tensor]:
    out = model_output(model, x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    named = [(rename(n), p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], g)
    return {n: grad for (n, _), grad in zip(named, grads)}


GRAD_CASES = [c for c in CASES if c.id in ("linear-rslora-bias", "gpt2-conv1d", "conv2d")]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradients_match_peft(case: Case, dropout: float, tmp_path: Path) -> None:
    """Same A, B, m: same outputs and gradients of A, B and m (in training mode; with dropout
    both draw the same masks from the global generator)."""
    ref = _peft_model(case, dropout)
    ref.save_pretrained(tmp_path)
    model = lorakit.from_pretrained(case.make(), tmp_path)
    ref.train()
    model.train()
    x = case.x()
    torch.manual_seed(7)
    want = _grads(ref, x, _our_name)
    torch.manual_seed(7)
    got = _grads(model, x, lambda n: n)
    assert got.keys() == want.keys()
    assert any(n.endswith("magnitude") for n in got)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=ATOL, msg=name)


def test_forward_matches_peft_in_float32_to_1e_6(tmp_path: Path) -> None:
    case = CASES[0]
    ref = _peft_model(case).eval()
    ref.save_pretrained(tmp_path)
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model_output(model, case.x()), model_output(ref, case.x()), rtol=0, atol=1e-6
        )


def test_two_active_dora_adapters_match_peft(tmp_path: Path) -> None:
    """PEFT applies active adapters in turn, each DoRA rescaling what came before it."""
    case = CASES[0]
    ref = _peft_model(case)
    ref.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lin1"], use_dora=True))
    ref.set_adapter("second")
    nudge_trainable(ref, seed=9)
    ref.save_pretrained(tmp_path)
    ref.base_model.set_adapter(["default", "second"])
    ref.eval()
    model = case.make()
    lorakit.load_adapter(model, tmp_path)
    lorakit.load_adapter(model, tmp_path, adapter_name="second")
    lorakit.set_active(model, ["default", "second"])
    model.eval()
    x = case.x()
    with torch.no_grad():
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        ref.merge_adapter(["default", "second"])
        lorakit.merge(model)
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        torch.testing.assert_close(model.lin1.weight, ref.base_model.model.lin1.base_layer.weight,
                                   rtol=0, atol=ATOL)  # fmt: skip
