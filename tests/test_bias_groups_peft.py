"""`lora_bias` and grouped convolutions against the real `peft` package, both ways.

The cases are PEFT's own LoRA table entries (tests/test_custom_models.py in huggingface/peft:
"Vanilla MLP 1 / Conv2d 1 / Conv3d 1 LoRA with lora_b bias", "Conv2d Groups / Groups2 LoRA"
and their DoRA twins) on equivalent tiny models, plus GPT-2's Conv1D, Conv1d / Conv3d groups
and a grouped conv with lora_bias. PEFT saves -> lorakit loads (same outputs, same merge or
the same refusal) and lorakit saves -> PEFT loads (same outputs).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from conftest import tiny_gpt2
from peft_cross import assert_same_merge, model_output, tokens
from torch import Tensor, nn

import lorakit
from lorakit.errors import MergeError

ATOL = 1e-5
# PEFT warns when it adapts a grouped conv or a lora_bias layer without a bias; so does lorakit
pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups"),
    pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed"),
    pytest.mark.filterwarnings("ignore:lora_bias=True on a"),
    pytest.mark.filterwarnings("ignore:Adapter .* have invalid shape"),  # PEFT on B's bias
]


class MLP(nn.Module):
    """PEFT's `MLP`: lin0 (10 -> 20), lin1 (20 -> 2), both with a bias unless told."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 2, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


class ConvNet(nn.Module):
    """A conv (PEFT's `ModelConv2D` / `ModelConv3D` / `ModelConv2DGroups(2)` shapes) then a
    Linear over its flattened output."""

    def __init__(self, dims: int, channels: tuple[int, int], groups: int = 1,
                 padding: int = 0, size: int = 3) -> None:  # fmt: skip
        super().__init__()
        torch.manual_seed(0)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(*channels, 3, padding=padding, groups=groups)
        side = size + 2 * padding - 2
        self.lin0 = nn.Linear(channels[1] * side**dims, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin0(torch.relu(self.conv(x)).flatten(1))


def _images(channels: int, dims: int, size: int = 3) -> Callable[[], Tensor]:
    shape = (2, channels, *(size,) * dims)
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _features() -> Tensor:
    return torch.randn(3, 10, generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    targets: tuple[str, ...]
    x: Callable[[], Tensor]
    both: dict = field(default_factory=dict)  # options both libraries name alike
    rank: int = 8
    alpha: int = 32  # PEFT's table: alpha != r, so the scale counts
    extra: dict = field(default_factory=dict)  # PEFT-only options
    merges: bool = True  # False: both libraries refuse the merge


BIAS = {"lora_bias": True}
DORA = {"use_dora": True}
CASES = [
    Case("mlp-lora-bias", MLP, ("lin0", "lin1"), _features, BIAS),
    Case("conv2d-lora-bias", lambda: ConvNet(2, (5, 10)), ("conv",), _images(5, 2), BIAS),
    Case("conv3d-lora-bias", lambda: ConvNet(3, (5, 10)), ("conv",), _images(5, 3), BIAS),
    Case("gpt2-conv1d-lora-bias", tiny_gpt2, ("c_attn", "c_proj"), tokens, BIAS,
         extra={"fan_in_fan_out": True}),
    Case("mlp-no-base-bias-lora-bias", lambda: MLP(bias=False), ("lin0", "lin1"), _features,
         BIAS, merges=False),
    Case("conv2d-groups", lambda: ConvNet(2, (16, 16), groups=8), ("conv",), _images(16, 2),
         merges=False),
    Case("conv2d-groups2", lambda: ConvNet(2, (16, 32), groups=2, padding=1, size=5),
         ("conv",), _images(16, 2, 5), merges=False),
    Case("conv2d-groups-dora", lambda: ConvNet(2, (16, 16), groups=8), ("conv",),
         _images(16, 2), DORA, merges=False),
    Case("conv2d-groups2-dora", lambda: ConvNet(2, (16, 32), groups=2, padding=1, size=5),
         ("conv",), _images(16, 2, 5), DORA, merges=False),
    Case("conv1d-groups", lambda: ConvNet(1, (8, 8), groups=2, size=6), ("conv",),
         _images(8, 1, 6), rank=4, merges=False),
    Case("conv3d-groups-dora", lambda: ConvNet(3, (4, 6), groups=2), ("conv",), _images(4, 3),
         DORA, rank=2, merges=False),
    Case("conv2d-groups-lora-bias", lambda: ConvNet(2, (16, 32), groups=4, padding=1),
         ("conv", "lin0"), _images(16, 2), BIAS, merges=False),
    # dropout (PEFT's file carries it to lorakit): a conv draws nn.Dropout's masks, as PEFT
    # (the Linear fused path draws its own seeded masks, so it is left out of this comparison)
    Case("conv2d-groups2-dora-dropout", lambda: ConvNet(2, (16, 32), groups=2, padding=1, size=5),
         ("conv",), _images(16, 2, 5), DORA, extra={"lora_dropout": 0.3}, merges=False),
]  # fmt: skip


def _nudge_adapters(model: nn.Module, seed: int) -> None:
    """Every adapter tensor (A, B, B's bias, m) random, as after training: in both libraries
    exactly the parameters with "lora" in their names."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _peft_model(case: Case) -> nn.Module:
    config = peft.LoraConfig(r=case.rank, lora_alpha=case.alpha, target_modules=list(case.targets),
                             **case.both, **case.extra)  # fmt: skip
    model = peft.get_peft_model(case.make(), config)
    _nudge_adapters(model, seed=5)
    return model.eval()


def _lorakit_config(case: Case) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(rank=case.rank, alpha=case.alpha, targets=case.targets,
                              **case.both)  # fmt: skip


def _lorakit_model(case: Case) -> nn.Module:
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    _nudge_adapters(model, seed=6)
    return model.eval()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_loads_in_lorakit(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    x = case.x()
    model = lorakit.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(ref, x), atol=1e-3)
        torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)
        if case.merges:
            assert_same_merge(ref, model, x, ATOL)
        else:
            _check_both_refuse_merge(ref, model, x)


def _check_both_refuse_merge(ref: nn.Module, model: nn.Module, x: Tensor) -> None:
    with pytest.raises((NotImplementedError, RuntimeError), match="not supported|Impossible"):
        copy.deepcopy(ref).merge_and_unload()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match=r"cannot merge adapter 'default' into .*nothing was"):
        lorakit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model_output(model, x), model_output(ref, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_lorakit_file_loads_in_peft(case: Case, tmp_path: Path) -> None:
    model = _lorakit_model(case)
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_bias"] is case.both.get("lora_bias", False)
    x = case.x()
    ref = peft.PeftModel.from_pretrained(case.make(), tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(model_output(case.make(), x), model_output(model, x), atol=1e-3)
        torch.testing.assert_close(model_output(ref, x), model_output(model, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parameters_start_as_peft_does(case: Case) -> None:
    """Same shapes for every adapter tensor; B, its bias and DoRA's m start as PEFT's."""
    config = peft.LoraConfig(r=case.rank, lora_alpha=case.alpha, target_modules=list(case.targets),
                             **case.both, **case.extra)  # fmt: skip
    ref = peft.get_peft_model(case.make(), config)
    model = case.make()
    lorakit.inject(model, _lorakit_config(case))
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {_our_name(n): p for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.shape == theirs[name].shape, name
        if not name.endswith("lora_A"):  # A is random in both
            torch.testing.assert_close(p, theirs[name], rtol=1e-6, atol=1e-6, msg=name)


def _our_name(peft_name: str) -> str:
    """PEFT's parameter name -> lorakit's: `...lin0.lora_B.default.bias` -> `lin0.lora.default.
    lora_bias`, `...conv.lora_magnitude_vector.default.weight` -> `conv.lora.default.magnitude`."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    name = re.sub(r"\.lora_B\.(\w+)\.bias$", r".lora.\1.lora_bias", name)
    name = re.sub(r"\.lora_([AB])\.(\w+)\.weight$", r".lora.\2.lora_\1", name)
    return re.sub(r"\.lora_magnitude_vector\.(\w+)\.weight$", r".lora.\1.magnitude", name)


GRAD_CASES = [c for c in CASES if c.id in ("mlp-lora-bias", "conv2d-groups2-dora",
                                           "conv2d-groups-lora-bias",
                                           "conv2d-groups2-dora-dropout")]  # fmt: skip


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_gradients_match_peft(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    model = lorakit.from_pretrained(case.make(), tmp_path)
    x = case.x()
    torch.manual_seed(7)  # with dropout, both draw the same masks from the global generator
    want = _grads(ref.train(), x, _our_name)
    torch.manual_seed(7)
    got = _grads(model.train(), x, lambda n: n)
    assert got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=ATOL, msg=name)


def _grads(model: nn.Module, x: Tensor, rename: Callable[[str], str]) -> dict[str, Tensor]:
    out = model_output(model, x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    named = [(rename(n), p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], g)
    return {n: grad for (n, _), grad in zip(named, grads)}


def test_peft_mixed_batch_with_lora_bias_matches_routing(tmp_path: Path) -> None:
    """PEFT's `adapter_names=` rows and lorakit's routing agree with lora_bias adapters."""
    case = CASES[0]
    ref = _peft_model(case)
    ref.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["lin0"]))
    _nudge_adapters(ref, seed=8)
    ref.save_pretrained(tmp_path)
    model = case.make()
    lorakit.load_adapter(model, tmp_path)
    lorakit.load_adapter(model, tmp_path / "plain", adapter_name="plain")
    rows = ["default", "__base__", "plain"]
    with torch.no_grad():
        want = ref.eval()(case.x(), adapter_names=rows)
        with lorakit.routing(model.eval(), [None if r == "__base__" else r for r in rows]):
            torch.testing.assert_close(model(case.x()), want, rtol=0, atol=ATOL)


def test_two_active_adapters_on_a_grouped_conv_match_peft(tmp_path: Path) -> None:
    """A lora_bias adapter, then a DoRA one, both active on one grouped conv: PEFT applies them
    in turn (DoRA rescaling what came before it), and so does lorakit."""
    case = next(c for c in CASES if c.id == "conv2d-groups-lora-bias")
    ref = _peft_model(case)
    ref.add_adapter("second", peft.LoraConfig(r=4, target_modules=["conv"], use_dora=True))
    _nudge_adapters(ref, seed=9)
    ref.save_pretrained(tmp_path)
    ref.base_model.set_adapter(["default", "second"])
    model = case.make()
    lorakit.load_adapter(model, tmp_path)
    lorakit.load_adapter(model, tmp_path / "second", adapter_name="second")
    lorakit.set_active(model, ["default", "second"])
    x = case.x()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=0, atol=ATOL)
