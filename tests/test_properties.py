"""Property-based tests: LoRA's invariants over random layers, shapes, dtypes and adapters.

Every adaptable layer type (tests/strategies.py: Linear with and without bias, GPT-2 Conv1D,
Embedding with and without padding_idx, Conv1d/2d/3d with strides, padding modes and
dilation), sizes 1 / odd / prime, ranks wider than the layer, float32 / float64 / bfloat16,
one to three adapters made non-trivial (random A and B). Properties:

    a fresh adapter is a no-op           disabled(model) is the base exactly
    merged equals adapted                unmerge gives the base weight back
    active adapters add up               the fused Linear path equals the plain one (value, grad)
    save_adapter / load_adapter into a fresh base is bitwise

Tolerances are relative to the size of what is compared, by the widest rounding involved
(float64 tight). Profiles live in tests/conftest.py ("ci" by default, HYPOTHESIS_PROFILE=long).
"""

from __future__ import annotations

import copy
import tempfile
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    LINEAR_KINDS,
    AdapterSpec,
    LayerSpec,
    adapted,
    adapter_lists,
    layer_specs,
    names,
    randomise,
)
from torch import nn

import lorakit
import lorakit.layers.linear as linear_module
from lorakit import LoraLayer, dropout_masks, fused

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])
SEEDS = st.integers(0, 2**16)
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _rtol(dtype: torch.dtype, adapters: list[AdapterSpec]) -> float:
    """The tolerance of the widest rounding among the base's and the adapters' dtypes."""
    return max(RTOL[d] for d in [dtype, *(a.dtype or dtype for a in adapters)])


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, scale: float = 0.0):
    """max |actual - expected| <= rtol * (the larger of max |expected| and `scale`)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not expected.numel():
        return
    err = _amax(actual.double() - expected.double())
    size = max(_amax(expected), scale, 1e-30)
    assert err <= rtol * size, f"error {err:.3g} > {rtol:g} * {size:.3g}"


def _amax(t: torch.Tensor) -> float:
    """max |t| in float64; 0 for an empty tensor."""
    return float(t.detach().double().abs().max()) if t.numel() else 0.0


def _no_grad_run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _layer(model: nn.Module) -> LoraLayer:
    layer = model[0]
    assert isinstance(layer, LoraLayer)
    return layer


# -- properties ---------------------------------------------------------------------------
@given(spec=layer_specs(), dtype=DTYPES, adapters=adapter_lists())
def test_fresh_adapters_are_a_no_op(spec: LayerSpec, dtype, adapters):
    x = spec.make_input(dtype)
    want = _no_grad_run(spec.build(dtype), x)
    model = adapted(spec, dtype, adapters)
    got = _no_grad_run(model, x)
    assert got.dtype == want.dtype
    if spec.linear_like:  # the fused path sums base and (zero) delta in another order
        _close(got, want, _rtol(dtype, adapters))
    else:  # base + exact zeros
        assert torch.equal(got, want)


@given(spec=layer_specs(), dtype=DTYPES, adapters=adapter_lists(), seed=SEEDS, merged=st.booleans())
def test_disabled_is_the_base_and_the_state_comes_back(spec, dtype, adapters, seed, merged):
    x = spec.make_input(dtype)
    base = _no_grad_run(spec.build(dtype), x)
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    adapted_out = _no_grad_run(model, x)
    if merged:
        lorakit.merge(model)
    with lorakit.disabled(model):
        inside = _no_grad_run(model, x)
    after = _no_grad_run(model, x)
    rtol = _rtol(dtype, adapters)
    if merged:  # the weights went W + d - d: equal up to rounding
        _close(inside, base, rtol, _delta_size(model, x))
        assert _layer(model).lora_merged == tuple(names(adapters))
        _close(after, adapted_out, rtol)
    else:
        assert torch.equal(inside, base)
        assert torch.equal(after, adapted_out)


@given(spec=layer_specs(), dtype=DTYPES, adapters=adapter_lists(), seed=SEEDS)
def test_merged_equals_adapted_and_unmerge_restores_the_base(spec, dtype, adapters, seed):
    x = spec.make_input(dtype)
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    layer = _layer(model)
    weight = layer.weight.detach().clone()
    with torch.no_grad():
        deltas = sum(layer.delta_weight(n).double() for n in names(adapters))
    scale = _amax(deltas)
    assert scale > 0  # a real delta, or merged == adapted would prove nothing
    rtol = _rtol(dtype, adapters)
    want = _no_grad_run(model, x)
    lorakit.merge(model)
    _close(layer.weight, weight.double() + deltas, rtol, _amax(weight))
    _close(_no_grad_run(model, x), want, rtol, _delta_size(model, x))
    lorakit.unmerge(model)
    assert layer.lora_merged == ()
    _close(layer.weight, weight, rtol, scale)
    _close(_no_grad_run(model, x), want, rtol)


@given(spec=layer_specs(), dtype=DTYPES, adapters=adapter_lists(), seed=SEEDS)
def test_active_adapters_add_up(spec, dtype, adapters, seed):
    """y(all active) - base = sum over adapters a of (y(only a) - base)."""
    x = spec.make_input(dtype)
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    together = _no_grad_run(model, x).double()
    with lorakit.disabled(model):
        base = _no_grad_run(model, x).double()
    alone = base.clone()
    for name in names(adapters):
        lorakit.set_active(model, name)
        alone += _no_grad_run(model, x).double() - base
    _close(together, alone, _rtol(dtype, adapters) * 3, _amax(base))


@given(spec=layer_specs(), dtype=DTYPES, adapters=adapter_lists(), seed=SEEDS)
def test_merge_and_unload_gives_a_plain_layer_computing_the_adapted_output(
    spec, dtype, adapters, seed
):
    x = spec.make_input(dtype)
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    want = _no_grad_run(model, x)
    size = _delta_size(model, x)
    lorakit.merge_and_unload(model)
    assert type(model[0]) is type(spec.build(dtype))
    assert lorakit.adapter_names(model) == ()
    _close(_no_grad_run(model, x), want, _rtol(dtype, adapters), size)


@given(
    spec=layer_specs(kinds=(*LINEAR_KINDS, "embedding")).filter(lambda s: len(s.batch) > 0),
    dtype=DTYPES,
    adapters=adapter_lists(),
    seed=SEEDS,
    data=st.data(),
)
def test_routing_equals_each_row_alone(spec, dtype, adapters, seed, data):
    """Row i under `routing` equals row i run alone with only its adapter active (or none)."""
    x = spec.make_input(dtype)
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    choices = st.sampled_from([None, *names(adapters)])
    rows = data.draw(st.lists(choices, min_size=spec.batch[0], max_size=spec.batch[0]))
    if not rows:  # an empty batch: routing needs one entry per row
        return
    with lorakit.routing(model, rows):
        routed = _no_grad_run(model, x)
    rtol = _rtol(dtype, adapters)
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(model):
                alone = _no_grad_run(model, x[i : i + 1])
        else:
            lorakit.set_active(model, name)
            alone = _no_grad_run(model, x[i : i + 1])
        _close(routed[i : i + 1], alone, rtol)


MERGE_CHOICES = st.sampled_from([None, True, False])  # fused.merge_pays, folded, thin


@given(
    spec=layer_specs(kinds=LINEAR_KINDS),
    dtype=DTYPES,
    adapters=adapter_lists(bias_modes=("none", "lora_only", "all")),
    seed=SEEDS,
    merge=MERGE_CHOICES,
)
def test_fused_path_equals_the_plain_path(spec, dtype, adapters, seed, merge):
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    layer = _layer(model)
    calls = []
    fused_op = linear_module.fused_lora_linear

    def forced(*args, **kwargs):
        calls.append(merge)
        return fused_op(*args, **kwargs, merge=merge)

    x = spec.make_input(dtype).requires_grad_()
    g = torch.randn(
        (*spec.batch, spec.out_dim), generator=torch.Generator().manual_seed(seed), dtype=dtype
    )
    params = [p for p in layer.parameters() if p.requires_grad]
    with mock.patch.object(linear_module, "fused_lora_linear", forced):
        fused = layer(x)
    assert calls == [merge]  # the fused path ran
    plain = LoraLayer.forward(layer, x)
    rtol = _rtol(dtype, adapters)
    _close(fused, plain, rtol)
    got = torch.autograd.grad(fused, [x, *params], g, allow_unused=True)
    want = torch.autograd.grad(plain, [x, *params], g, allow_unused=True)
    for p, a, b in zip([x, *params], got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == p.dtype
            _close(a, b, rtol * 10)  # sums over tokens: more roundings


@st.composite
def _fused_cases(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 3))
    return {
        "tokens": draw(st.sampled_from([1, 2, 3, 7, 40])),
        "in_dim": draw(st.sampled_from([1, 2, 5, 11])),
        "out_dim": draw(st.sampled_from([1, 3, 7])),
        "ranks": draw(st.lists(st.sampled_from([1, 2, 5]), min_size=n, max_size=n)),
        "scales": draw(st.lists(st.sampled_from([0.25, 1.0, 3.0]), min_size=n, max_size=n)),
        "dropout": draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9]), min_size=n, max_size=n)),
        "transposed": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "merge": draw(MERGE_CHOICES),
        "block": draw(st.sampled_from([1, 3, 16, 1 << 16])),  # small: the blocked CPU masks
        "seed": draw(SEEDS),
    }


@given(case=_fused_cases(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_fused_op_with_seeded_dropout_matches_its_reference(case, dtype):
    """`fused_lora_linear` with a seed equals x W^T + b + sum s_a ((x * mask_a) A_a^T) B_a^T,
    mask_a = `dropout_mask(..., seed + a)`, in value and in every gradient."""
    gen = torch.Generator().manual_seed(case["seed"])

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    n_in, n_out, tokens = case["in_dim"], case["out_dim"], case["tokens"]
    x = leaf(tokens, n_in)
    weight = leaf(n_in, n_out) if case["transposed"] else leaf(n_out, n_in)
    bias = leaf(n_out) if case["bias"] else None
    As = [leaf(r, n_in) for r in case["ranks"]]
    Bs = [leaf(n_out, r) for r in case["ranks"]]
    with mock.patch.object(dropout_masks, "_BLOCK", case["block"]):
        got = fused.fused_lora_linear(
            x, weight, bias, tuple(As), tuple(Bs), tuple(case["scales"]),
            dropout=tuple(case["dropout"]), seed=case["seed"],
            transposed=case["transposed"], merge=case["merge"],
        )  # fmt: skip
    w = weight.t() if case["transposed"] else weight
    want = x @ w.t() + (0 if bias is None else bias)
    for i, (A, B, s, p) in enumerate(zip(As, Bs, case["scales"], case["dropout"])):
        mask = dropout_masks.dropout_mask(x.shape, p, case["seed"] + i, x.device, dtype)
        want = want + ((x * mask) @ A.t()) @ B.t() * s
    rtol = RTOL[dtype] * 10
    _close(got, want, rtol)
    leaves = [t for t in (x, weight, bias, *As, *Bs) if t is not None]
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        _close(a, b, rtol * 10)


@given(
    spec=layer_specs(),
    dtype=DTYPES,
    adapters=adapter_lists(bias_modes=("none", "lora_only", "all")),
    seed=SEEDS,
)
def test_save_load_into_a_fresh_base_is_bitwise(spec, dtype, adapters, seed):
    model = adapted(spec, dtype, adapters)
    randomise(model, seed)
    layer = _layer(model)
    trains_bias = any(a.bias != "none" for a in adapters)
    if trains_bias and getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            layer.bias.add_(1.5)  # a trained bias is part of the adapter file
    fresh = nn.Sequential(spec.build(dtype)).eval()
    with tempfile.TemporaryDirectory() as folder:
        for name in names(adapters):
            lorakit.save_adapter(model, folder, adapter_name=name)
        for name in names(adapters):
            lorakit.load_adapter(fresh, folder, adapter_name=name)
    lorakit.set_active(fresh, names(adapters))
    loaded = _layer(fresh)
    assert type(loaded) is type(layer)
    for name in names(adapters):
        mine, theirs = layer.lora[name], loaded.lora[name]
        assert (theirs.rank, theirs.scaling, theirs.dropout_p) == (
            mine.rank,
            mine.scaling,
            mine.dropout_p,
        )
        for p, q in ((mine.lora_A, theirs.lora_A), (mine.lora_B, theirs.lora_B)):
            assert q.dtype == p.dtype and torch.equal(q, p)
    for (key, p), (key2, q) in zip(layer.named_parameters(), loaded.named_parameters()):
        assert key == key2 and torch.equal(p, q), key
    x = spec.make_input(dtype)
    assert torch.equal(_no_grad_run(fresh, x), _no_grad_run(model, x))


# -- found by the suite ----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["inject", "load_adapter"])
def test_an_adapter_added_to_an_eval_model_is_in_eval_mode(how, tmp_path):
    config = lorakit.LoraConfig(rank=2, dropout=0.5, targets=("0",))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    if how == "inject":
        lorakit.inject(model, config)
    else:
        source = copy.deepcopy(model)
        lorakit.inject(source, config)
        lorakit.save_adapter(source, tmp_path)
        lorakit.load_adapter(model, tmp_path)
    assert not any(m.training for m in model.modules())
    randomise(model, seed=0)
    x = torch.randn(8, 4)
    assert torch.equal(_no_grad_run(model, x), _no_grad_run(model, x))


# -- helpers ------------------------------------------------------------------------------
def _delta_size(model: nn.Module, x: torch.Tensor) -> float:
    """max |sum of the adapters' deltas| on x, computed in float64: the size that a merge's
    rounding (of W + d) scales with."""
    layer = _layer(model)
    with torch.no_grad():
        x64 = x.double() if x.is_floating_point() else x
        total = sum(layer.lora_delta(_as64(layer.lora[n]), x64) for n in layer.lora_active)
    return _amax(total) if torch.is_tensor(total) else 0.0


def _as64(adapter: nn.Module) -> nn.Module:
    return copy.deepcopy(adapter).double()
