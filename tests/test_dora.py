"""DoRA (`LoraConfig(use_dora=True)`): the row norms, forward, merge, states and refusals,
against a direct implementation of the paper's formula. PEFT's numbers: tests/test_dora_peft.py.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.errors import AdapterError, ConfigError, UnsupportedLayerError
from lorakit.layers import LoRALinear
from lorakit.layers.dora import DoRA, row_norms
from lorakit.layers.linear import LinearLoraMixin

ATOL = 1e-6


class Holder(nn.Module):
    """One layer at the path "layer", as in a real model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], nn.Module]
    x: Callable[[], Tensor]
    rows: Callable[[nn.Module], Tensor]  # the base weight as (out, in)


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return Holder(make())

    return build


def _x(*shape: int) -> Callable[[], Tensor]:
    return lambda: torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _ids() -> Tensor:
    return torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))


CASES = [
    Case("linear-bias", _seeded(lambda: nn.Linear(9, 7)), _x(2, 3, 9), lambda m: m.weight),
    Case("linear-nobias", _seeded(lambda: nn.Linear(9, 7, bias=False)), _x(4, 9),
         lambda m: m.weight),
    Case("gpt2-conv1d", _seeded(lambda: Conv1D(7, 9)), _x(2, 3, 9), lambda m: m.weight.t()),
    Case("embedding", _seeded(lambda: nn.Embedding(11, 6)), _ids, lambda m: m.weight.t()),
    Case("conv1d", _seeded(lambda: nn.Conv1d(3, 5, 3, padding=1)), _x(2, 3, 8),
         lambda m: m.weight.flatten(1)),
    Case("conv2d-nobias", _seeded(lambda: nn.Conv2d(3, 4, 3, stride=2, bias=False)),
         _x(2, 3, 7, 7), lambda m: m.weight.flatten(1)),
]  # fmt: skip
RANKS = [1, 3, 8]


def _dora(case: Case, rank: int, **options: object) -> nn.Module:
    model = case.make()
    config = lorakit.LoraConfig(rank=rank, alpha=2.0 * rank, targets=("layer",), use_dora=True,
                                **options)  # fmt: skip
    lorakit.inject(model, config)
    _randomise(model)
    return model


def _randomise(model: nn.Module, seed: int = 3) -> None:
    """A, B and m random, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DoRA):
                for p in (module.lora_A, module.lora_B):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                module.magnitude.mul_(1 + 0.2 * torch.rand(module.magnitude.shape,
                                                           generator=generator))  # fmt: skip


def _reference(case: Case, model: nn.Module, x: Tensor) -> Tensor:
    """The paper's formula, written out: m / ||W + s B A|| (detached) * (W + s B A) x + b."""
    layer = model.layer
    adapter = layer.lora["default"]
    rows = case.rows(layer)
    B, A = adapter.lora_B.flatten(1), adapter.lora_A.flatten(1)
    V = rows + adapter.scaling * B @ A
    f = adapter.magnitude.reshape(-1) / torch.linalg.norm(V, dim=1).detach()
    if layer.weight.dim() > 2:
        return layer._conv_forward(x, (f[:, None] * V).view_as(layer.weight), layer.bias)
    if case.id == "embedding":
        return nn.functional.embedding(x, (f[:, None] * V).t())
    y = x @ (f[:, None] * V).t()
    return y if layer.bias is None else y + layer.bias


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("out", "inp", "rank"), [(7, 9, 1), (16, 5, 4), (33, 64, 8)])
def test_row_norms_match_the_dense_norm(out: int, inp: int, rank: int, transposed: bool) -> None:
    g = torch.Generator().manual_seed(rank)
    W = torch.randn(inp, out, generator=g).t() if transposed else torch.randn(out, inp, generator=g)
    A, B = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
    dense = torch.linalg.norm(W + 0.7 * B @ A, dim=1)
    torch.testing.assert_close(row_norms(W, A, B, 0.7), dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fresh_dora_is_a_no_op(case: Case) -> None:
    base = case.make()
    model = case.make()
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("layer",), use_dora=True))
    adapter = model.layer.lora["default"]
    norms = torch.linalg.norm(case.rows(base.layer), dim=1)
    torch.testing.assert_close(adapter.magnitude.reshape(-1), norms)
    with torch.no_grad():
        torch.testing.assert_close(model(case.x()), base(case.x()), rtol=0, atol=ATOL)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_and_gradients_match_the_formula(case: Case, rank: int) -> None:
    model = _dora(case, rank)
    x = case.x()
    ours, ref = model(x), _reference(case, model, x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)
    adapter = model.layer.lora["default"]
    params = (adapter.lora_A, adapter.lora_B, adapter.magnitude)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad(ours, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


FUSED = [c for c in CASES if c.id.startswith(("linear", "gpt2"))]


@pytest.mark.parametrize("case", FUSED, ids=[c.id for c in FUSED])
def test_fused_path_computes_the_plain_path(case: Case) -> None:
    """DoRA last, no dropout: f * fused(x) + b, equal to PEFT's form (the plain path)."""
    model = _dora(case, 4, bias="lora_only")
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("layer",)), "plain")
    _randomise(model, seed=4)
    lorakit.set_active(model, ["plain", "default"])
    layer, x = model.layer, case.x().requires_grad_()
    assert [type(a) for a in layer._fused_adapters(x)] == [lorakit.layers.LoRA, DoRA]
    params = [x, *(p for p in model.parameters() if p.requires_grad)]
    assert any(p is layer.bias for p in params) == (layer.bias is not None)
    fused = model(x)
    g = torch.randn(fused.shape, generator=torch.Generator().manual_seed(2))
    plain = lorakit.layers.LoraLayer.forward(layer, x)
    torch.testing.assert_close(fused, plain, rtol=0, atol=ATOL)
    for a, b in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_path_is_not_taken_where_dora_differs() -> None:
    case = CASES[0]
    model = _dora(case, 4, dropout=0.1)
    layer, x = model.layer, case.x()
    assert layer._fused_adapters(x) == []  # dropout in training: PEFT's other form
    model.eval()
    assert layer._fused_adapters(x) != []
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("layer",)), "plain")
    lorakit.set_active(model, ["default", "plain"])
    assert layer._fused_adapters(x) == []  # DoRA not last: it does not rescale "plain"


def test_weight_norm_cache_follows_the_weight() -> None:
    case = CASES[0]
    model = _dora(case, 4)
    x = case.x()
    model(x)
    with torch.no_grad():
        model.layer.weight.mul_(1.5)  # an in-place change: the cached ||W_j||^2 is stale
    torch.testing.assert_close(model(x), _reference(case, model, x), rtol=0, atol=ATOL)
    model.layer.weight = nn.Parameter(model.layer.weight.detach() * 0.5)  # a new tensor
    torch.testing.assert_close(model(x), _reference(case, model, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_merge_matches_forward_and_unmerge_is_exact(case: Case) -> None:
    model = _dora(case, 3).eval()
    x = case.x()
    weight = model.layer.weight.detach().clone()
    with torch.no_grad():
        before = model(x)
        lorakit.merge(model)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        lorakit.unmerge(model)
        assert torch.equal(model.layer.weight, weight)  # the kept original: bit for bit
        lorakit.merge(model, keep_original=False)
        lorakit.unmerge(model)
        torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        merged = lorakit.merge_and_unload(copy.deepcopy(model))
        assert type(merged.layer) is type(case.make().layer)
        torch.testing.assert_close(merged(x), before, rtol=0, atol=1e-5)


def _two_adapters(case: Case, first_dora: bool) -> nn.Module:
    model = case.make()
    config = lorakit.LoraConfig(rank=2, targets=("layer",), use_dora=first_dora)
    lorakit.inject(model, config, "first")
    lorakit.inject(model, lorakit.LoraConfig(rank=3, targets=("layer",), use_dora=True), "second")
    _randomise(model)
    if not first_dora:
        lorakit.layers.LoRA.reset_parameters(model.layer.lora["first"])
        with torch.no_grad():
            model.layer.lora["first"].lora_B.normal_(generator=torch.Generator().manual_seed(5))
    lorakit.set_active(model, ["first", "second"])
    return model.eval()


@pytest.mark.parametrize("first_dora", [True, False], ids=["dora+dora", "lora+dora"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_several_adapters_merge_like_their_forward(case: Case, first_dora: bool) -> None:
    model = _two_adapters(case, first_dora)
    x = case.x()
    weight = model.layer.weight.detach().clone()
    with torch.no_grad():
        before = model(x)
        for keep in (True, False):
            lorakit.merge(model, keep_original=keep)
            torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
            lorakit.unmerge(model)
            if keep:
                assert torch.equal(model.layer.weight, weight)
            else:  # undone by division and subtraction: rounds
                torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-4)
        model.layer.merge(("first",))  # one merged, the DoRA one after it computed unmerged
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        model.layer.merge(("second",), keep_original=False)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        model.layer.unmerge(("second",))  # undone by division: rounds
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
        model.layer.merge(("second",), keep_original=False)
        model.layer.unmerge(("first",))  # DoRA does not commute: all undone, "second" redone
        assert model.layer.lora_merged == ("second",)
        only_second = copy.deepcopy(model)
        only_second.layer.unmerge()
        only_second.layer.merge(("second",))
        torch.testing.assert_close(model.layer.weight, only_second.layer.weight, rtol=0, atol=1e-4)
        lorakit.unmerge(model)
        torch.testing.assert_close(model.layer.weight, weight, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_disabled_gives_the_base_and_restores_the_merge(case: Case) -> None:
    model = _dora(case, 2).eval()
    x = case.x()
    with torch.no_grad():
        before = model(x)
        lorakit.merge(model)
        with lorakit.disabled(model):
            torch.testing.assert_close(model(x), case.make()(x), rtol=0, atol=ATOL)
        assert model.layer.lora_merged == ("default",)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_dropout_in_training_follows_peft_form() -> None:
    """With dropout in training mode PEFT rescales W drop(x), not the base output."""
    case = CASES[0]
    model = _dora(case, 4, dropout=0.5).train()
    layer, x = model.layer, case.x()
    adapter = layer.lora["default"]
    torch.manual_seed(9)
    ours = model(x)
    torch.manual_seed(9)
    xd = nn.functional.dropout(x, 0.5, training=True)
    f = adapter.magnitude / row_norms(layer.weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
    lora = xd @ adapter.lora_A.t() @ adapter.lora_B.t() * adapter.scaling
    want = layer.base_class.forward(layer, x) + (f - 1) * (xd @ layer.weight.t()) + f * lora
    torch.testing.assert_close(ours, want, rtol=0, atol=ATOL)


def test_pickle_and_deepcopy_keep_dora() -> None:
    case = CASES[2]
    model = _dora(case, 3)
    x = case.x()
    model(x)  # fills the norm cache, a weak reference
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)


ROUTED = [c for c in CASES if not c.id.startswith("conv")]


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("case", ROUTED, ids=[c.id for c in ROUTED])
def test_mixed_batch_rows_match_each_adapter_alone(case: Case, reuse: bool) -> None:
    """Rows of DoRA, LoRA and no adapter in one batch: each row as if run alone."""
    model = _dora(case, 3)
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("layer",)), "plain")
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("layer",), use_dora=True), "other")
    _randomise(model, seed=6)
    model.eval()
    x = torch.cat([case.x()] * 2)[:4]
    rows = ["default", None, "plain", "other"]
    with torch.no_grad():
        with lorakit.routing(model, rows, reuse_stacks=reuse):
            routed = model(x)
        for i, name in enumerate(rows):
            with lorakit.disabled(model) if name is None else _only(model, name):
                alone = model(x[i : i + 1])
            torch.testing.assert_close(routed[i : i + 1], alone, rtol=0, atol=ATOL)


def _only(model: nn.Module, name: str):  # noqa: ANN202
    lorakit.set_active(model, name)
    return contextlib.nullcontext()


def test_mixed_batch_gradients_reach_the_magnitude() -> None:
    case = CASES[0]
    model = _dora(case, 3)
    x = case.x()[:2]
    with lorakit.routing(model, ["default", None]):
        routed = model(x)
    lorakit.set_active(model, "default")
    alone = model(x[:1])
    m = model.layer.lora["default"].magnitude
    got, want = torch.autograd.grad(routed[:1].sum(), m), torch.autograd.grad(alone.sum(), m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mixed_batch_refuses_dora_dropout_in_training() -> None:
    model = _dora(CASES[0], 2, dropout=0.1)
    with lorakit.routing(model, ["default", None]):
        with pytest.raises(AdapterError, match=r"do not route DoRA adapter\(s\) \['default'\]"):
            model(CASES[0].x()[:2])
        model.eval()
        model(CASES[0].x()[:2])  # eval: no dropout, routed


class NoDoraLinear(LinearLoraMixin, nn.Linear):
    """A LoRA layer type whose math DoRA does not cover (as a quantized layer might be)."""

    base_class = nn.Linear
    supports_dora = False


def _int8_linear() -> nn.Linear:
    layer = nn.Linear(3, 4)
    layer.weight = nn.Parameter(torch.zeros(4, 3, dtype=torch.int8), requires_grad=False)
    return LoRALinear.adapt(layer)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: NoDoraLinear.adapt(nn.Linear(3, 4)),
         r"use_dora=True is not supported on NoDoraLinear layers; DoRA supports Linear"),
        (_int8_linear, r"use_dora=True needs a floating-point base weight; LoRALinear has "
                       r"torch.int8"),
    ],
)  # fmt: skip
def test_dora_refused_where_it_does_not_apply(make: Callable[[], nn.Module], match: str) -> None:
    layer = make()
    with pytest.raises(UnsupportedLayerError, match=match):
        layer.add_adapter("default", lorakit.LoraConfig(use_dora=True))
    assert not layer.lora  # nothing added


def test_use_dora_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"use_dora must be a bool, got 'yes'"):
        lorakit.LoraConfig(use_dora="yes")  # type: ignore[arg-type]


def test_bfloat16_fused_path_keeps_a_magnitude_near_one() -> None:
    """f = 1.003 (float32 m) rounds to 1 in bfloat16: the fused path carries f - 1 instead."""
    torch.manual_seed(0)
    model = Holder(nn.Linear(64, 32)).to(torch.bfloat16)
    lorakit.inject(model, lorakit.LoraConfig(rank=4, targets=("layer",), use_dora=True))
    layer = model.layer
    with torch.no_grad():
        layer.lora["default"].magnitude.mul_(1.003)
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    assert layer._fused_adapters(x)
    with torch.no_grad():
        got = model(x).double()
    bias = layer.bias.double()
    plain = x.double() @ layer.weight.double().t()
    # bfloat16 rounds each output by ~0.2%, without bias: the mean relative shift shows f
    shift = ((got - bias - plain) * plain.sign()).mean() / plain.abs().mean()
    assert 0.0025 < shift < 0.0035


def test_dora_refused_on_quantized_layers() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = Holder(bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False))
    with pytest.raises(UnsupportedLayerError, match=r"not supported on LoRALinear8bitLt layers"):
        lorakit.inject(model, lorakit.LoraConfig(targets=("layer",), use_dora=True))
