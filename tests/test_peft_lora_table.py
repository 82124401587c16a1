"""PEFT's own LoRA test table (huggingface/peft tests/test_custom_models.py, the `LoraConfig`
cases and the multiple-active-adapter cases), as lorakit cross tests against the real `peft`
package, both ways: PEFT saves -> lorakit loads (same outputs, same merge) and lorakit saves ->
PEFT loads (same outputs).

Only the cases lorakit supports are here; `target_parameters` and `trainable_token_indices`
have their own cross tests (test_target_parameters_peft.py, test_trainable_tokens_peft.py),
and the rest of that table (VeLoRA, KaSA, MonteCLoRA) is refused with a clear error.
Grouped convolutions are not merged by either library (both refuse). The models
follow PEFT's test models (MLP, EmbConv1D, Conv1d/2d/3d, Conv2dGroups, MHA) with their layer
names. Two bugs of PEFT 0.21 are allowed
for, each detected in `peft_quirks`: it adds an MHA out_proj's delta twice (the reference's B
is divided accordingly), and it cannot merge a 1x1x1 Conv3d (lorakit's merge is then compared
with PEFT's unmerged outputs).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import peft
import pytest
import torch
from peft_quirks import PEFT_OUT_PROJ_FACTOR, fix_peft_out_proj, peft_merges_conv3d_1x1
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import lorakit

ATOL = 1e-5


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(x.float())))))


class EmbConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.sm(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)))


class ConvNd(nn.Module):
    """A conv then `lin0`, as PEFT's Conv1d / Conv2d / Conv3d / Conv3d1x1 models."""

    def __init__(self, dims: int, kernel: int = 3) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        setattr(self, f"conv{dims}d", conv(5, 10, kernel))
        self.dims = dims
        self.lin0 = nn.Linear(10 * (4 - kernel) ** dims, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        conv = getattr(self, f"conv{self.dims}d")
        return self.sm(self.lin0(torch.relu(conv(x)).flatten(1)))


class Conv2dGroups(nn.Module):
    """PEFT's grouped-conv model: groups=8 with the default rank 8."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.lin0(x.flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(torch.relu(self.conv2d(x)).flatten(1)))


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        x, _ = self.mha(x, x, x)
        return self.sm(self.lin0(x))


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


def _randn(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(1))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor]]] = {
    "MLP": (_seeded(MLP), _randn(6, 10)),
    "EmbConv1D": (_seeded(EmbConv1D), lambda: torch.arange(90).reshape(9, 10)),
    "Conv1d": (_seeded(lambda: ConvNd(1)), _randn(2, 5, 3)),
    "Conv2d": (_seeded(lambda: ConvNd(2)), _randn(2, 5, 3, 3)),
    "Conv3d": (_seeded(lambda: ConvNd(3)), _randn(2, 5, 3, 3, 3)),
    "Conv3d1x1": (_seeded(lambda: ConvNd(3, kernel=1)), _randn(2, 5, 3, 3, 3)),
    "Conv2dGroups": (_seeded(Conv2dGroups), _randn(9, 10)),
    "MHA": (_seeded(Mha), _randn(4, 3, 10)),
}


@dataclass(frozen=True)
class Case:
    """One row of PEFT's table: its name, model, and PEFT LoraConfig options; `second` is a
    second adapter's options (both active), as in PEFT's multiple-active-adapter table."""

    name: str
    model: str
    options: dict
    second: dict | None = None
    extra: dict = field(default_factory=dict)  # PEFT-only options (fan_in_fan_out)
    merges: bool = True  # False: both libraries refuse to merge it

    def lorakit_config(self, options: dict) -> lorakit.LoraConfig:
        return lorakit.LoraConfig(**_lorakit_options(options))


_NAMES = {
    "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
}  # fmt: skip


def _lorakit_options(options: dict) -> dict:
    out = {"rank": 8, "alpha": 8}  # PEFT's defaults
    for key, value in options.items():
        if key == "init_lora_weights" and isinstance(value, str):
            out["init"] = value
            continue
        if key in ("init_lora_weights", "fan_in_fan_out"):
            continue  # the tests randomise both factors; GPT-2 Conv1D's layout is the class's
        value = tuple(value) if isinstance(value, list) else value
        out[_NAMES.get(key, key)] = value
    return out


GPT2 = {"fan_in_fan_out": True}
CASES = [
    Case("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    Case("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    Case("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    Case("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    Case("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    Case("Vanilla MLP 6 LoRA", "MLP",
         {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    Case("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    Case("Vanilla MLP 8 LoRA with DoRA", "MLP",
         {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    Case("Vanilla MLP 9 LoRA with DoRA", "MLP",
         {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    Case("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]},
         extra=GPT2),
    Case("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    Case("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D",
         {"target_modules": ["emb", "conv1d"]}, extra=GPT2),
    Case("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D",
         {"target_modules": ["conv1d"], "use_dora": True}, extra=GPT2),
    Case("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D",
         {"target_modules": ["emb"], "use_dora": True}),
    Case("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D",
         {"target_modules": ["emb", "conv1d"], "use_dora": True}, extra=GPT2),
    Case("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    Case("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    Case("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    Case("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    Case("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    Case("Conv2d 2 LoRA with DoRA", "Conv2d",
         {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    Case("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    Case("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    Case("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    Case("Conv3d 2 LoRA with DoRA", "Conv3d",
         {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    Case("Conv3d 1x1 LoRA", "Conv3d1x1", {"target_modules": ["conv3d"]}),
    Case("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1",
         {"target_modules": ["conv3d"], "use_dora": True}),
    Case("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}, merges=False),
    Case("Conv2d Groups LoRA with DoRA", "Conv2dGroups",
         {"target_modules": ["conv2d"], "use_dora": True}, merges=False),
    Case("Vanilla MLP 1 LoRA with lora_b bias", "MLP",
         {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv2d 1 LoRA with lora_b bias", "Conv2d",
         {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    Case("Conv3d 1 LoRA with lora_b bias", "Conv3d",
         {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    Case("Vanilla MLP 1 LoRA with MiCA", "MLP",
         {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}),
    Case("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    Case("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    # config patterns of PEFT's LoraConfig beyond the table: ranks, alphas, rsLoRA, bias modes
    Case("MLP rank and alpha patterns", "MLP",
         {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 6,
          "rank_pattern": {"lin1": 2}, "alpha_pattern": {"lin0": 3}}),
    Case("MLP rslora", "MLP", {"target_modules": ["lin0", "lin1"], "use_rslora": True}),
    Case("MLP bias all", "MLP", {"target_modules": ["lin0"], "bias": "all"}),
    Case("MLP bias lora_only", "MLP", {"target_modules": ["lin0", "lin1"], "bias": "lora_only"}),
    Case("MLP modules_to_save bias all", "MLP",
         {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "bias": "all"}),
    Case("Conv2d rslora pattern", "Conv2d",
         {"target_modules": ["conv2d", "lin0"], "use_rslora": True, "rank_pattern": {"conv2d": 3}}),
    # PEFT's multiple-active-adapter table
    Case("LoRA Same", "MLP", {"target_modules": ["lin0"]}, second={"target_modules": ["lin0"]}),
    Case("LoRA Different", "MLP", {"target_modules": ["lin0"]},
         second={"target_modules": ["lin1"]}),
    Case("LoRA Same DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True},
         second={"target_modules": ["lin0"], "use_dora": True}),
    Case("LoRA Different ranks", "Conv2d", {"target_modules": ["conv2d"], "r": 2},
         second={"target_modules": ["conv2d", "lin0"], "r": 4, "lora_alpha": 3}),
    Case("MHA Same", "MHA", {"target_modules": ["mha"]}, second={"target_modules": ["mha"]}),
]  # fmt: skip


def _nudge(model: nn.Module, seed: int) -> None:
    """Every trainable tensor and every LoRA factor random, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad or "lora" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def _peft_model(case: Case) -> nn.Module:
    make, _ = MODELS[case.model]
    model = peft.get_peft_model(make(), peft.LoraConfig(**case.options, **case.extra))
    if case.second is not None:
        model.add_adapter("other", peft.LoraConfig(**case.second, **case.extra))
        model.base_model.set_adapter(["default", "other"])
    _nudge(model, seed=5)
    return model


def _merged_peft(ref: nn.Module, case: Case) -> nn.Module:
    """PEFT's merge_and_unload of `ref`, or `ref` itself where PEFT cannot merge."""
    if case.model == "Conv3d1x1" and not PEFT_MERGES_CONV3D_1X1:
        return ref
    return copy.deepcopy(ref).merge_and_unload()


PEFT_MERGES_CONV3D_1X1 = peft_merges_conv3d_1x1()


def _lorakit_model(case: Case) -> nn.Module:
    make, _ = MODELS[case.model]
    model = make()
    lorakit.inject(model, case.lorakit_config(case.options))
    if case.second is not None:
        lorakit.inject(model, case.lorakit_config(case.second), adapter_name="other")
        lorakit.set_active(model, ["default", "other"])
    _nudge(model, seed=6)
    return model


def _names(case: Case) -> list[str]:
    return ["default"] if case.second is None else ["default", "other"]


def _run(model: nn.Module, case: Case) -> Tensor:
    _, x = MODELS[case.model]
    with torch.no_grad():
        return model.eval()(x())


def _base(case: Case) -> Tensor:
    return _run(MODELS[case.model][0](), case)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_peft_saves_lorakit_loads(case: Case, tmp_path: Path) -> None:
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    model = MODELS[case.model][0]()
    for name in _names(case):
        lorakit.load_adapter(model, tmp_path, adapter_name=name)
    lorakit.set_active(model, _names(case))
    want = _run(ref, case)
    assert not torch.allclose(_base(case), want, atol=1e-4)
    torch.testing.assert_close(_run(model, case), want, rtol=0, atol=ATOL)
    if not case.merges:
        return
    merged_ref = _merged_peft(ref, case)
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    torch.testing.assert_close(_run(merged, case), _run(merged_ref, case), rtol=0, atol=ATOL)
    if merged_ref is ref:
        return
    theirs = merged_ref.state_dict()
    assert merged.state_dict().keys() == theirs.keys()
    for key, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, theirs[key], rtol=0, atol=ATOL, msg=key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lorakit_saves_peft_loads(case: Case, tmp_path: Path) -> None:
    model = _lorakit_model(case)
    for name in _names(case):
        lorakit.save_adapter(model, tmp_path, adapter_name=name)
    ref = peft.PeftModel.from_pretrained(MODELS[case.model][0](), tmp_path)
    if case.second is not None:
        ref.load_adapter(tmp_path / "other", adapter_name="other")
        ref.base_model.set_adapter(["default", "other"])
    fix_peft_out_proj(ref)
    want = _run(model, case)
    assert not torch.allclose(_base(case), want, atol=1e-4)
    torch.testing.assert_close(_run(ref, case), want, rtol=0, atol=ATOL)


def _our_name(peft_name: str) -> str:
    """PEFT's parameter name -> lorakit's: `lin0.lora_A.default.weight` -> `lin0.lora.default
    .lora_A`, `lin1.modules_to_save.default.weight` -> `lin1.weight`, `x.base_layer.bias` ->
    `x.bias`, `emb.lora_embedding_A.default` -> `emb.lora.default.lora_A`, `lin0.lora_B.default
    .bias` -> `lin0.lora.default.lora_bias`."""
    name = peft_name.removeprefix("base_model.model.")
    name = re.sub(r"\.modules_to_save\.\w+\.", ".", name).replace(".base_layer.", ".")
    name = re.sub(r"\.lora_B\.(\w+)\.bias$", r".lora.\1.lora_bias", name)
    name = re.sub(r"\.lora_(?:embedding_)?([AB])\.(\w+)(?:\.weight)?$", r".lora.\2.lora_\1", name)
    return re.sub(r"\.lora_magnitude_vector\.(\w+)\.weight$", r".lora.\1.magnitude", name)


def _grads(model: nn.Module, case: Case, rename: Callable[[str], str]) -> dict[str, Tensor]:
    """Gradients of every trainable tensor in training mode (dropout masks from the seed)."""
    model.train()
    torch.manual_seed(7)
    out = model(MODELS[case.model][1]())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    named = [(rename(n), p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in named], g, allow_unused=True)
    return {n: grad for (n, _), grad in zip(named, grads) if grad is not None}


# lorakit's fused path draws its dropout masks its own way (same distribution, other masks;
# its plain path draws PEFT's): rows with dropout are left out (outputs compared above)
GRAD_CASES = [c for c in CASES if not c.options.get("lora_dropout")]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_gradients_match_peft(case: Case, tmp_path: Path) -> None:
    """Same factors: the same gradients for every trainable tensor (A, B, m, biases, saved
    modules). PEFT 0.21 loses the gradient of all but the last active adapter of an MHA (each
    merge starts from `in_proj_weight.data.detach()`): those lorakit has and PEFT lacks."""
    ref = _peft_model(case)
    ref.save_pretrained(tmp_path)
    fix_peft_out_proj(ref)
    model = MODELS[case.model][0]()
    for name in _names(case):
        lorakit.load_adapter(model, tmp_path, adapter_name=name)
    lorakit.set_active(model, _names(case))
    want = _grads(ref, case, _our_name)
    for name in want:  # PEFT's second out_proj delta bypasses autograd: see peft_quirks
        if re.search(r"out_proj\.lora\.\w+\.lora_A$", name):
            want[name] = want[name] * PEFT_OUT_PROJ_FACTOR
    got = _grads(model, case, lambda n: n)
    lost = {n for n in got.keys() - want.keys() if re.match(r"mha\.(out_proj\.)?lora\.default", n)}
    assert got.keys() - lost == want.keys()
    assert not lost or (case.model == "MHA" and case.second is not None)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=ATOL, msg=name)
