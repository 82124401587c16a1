"""LoRA over bitsandbytes' 4-bit and 8-bit linears (QLoRA): forward, gradients, checkpoints."""

from __future__ import annotations

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from conftest import randomise_lora
from qlora_models import IN, KINDS, full_mlp, quantized_mlp
from torch import nn

import lorakit
from lorakit.errors import UnsupportedLayerError
from lorakit.layers.dequantize import dequantized_weight

CONFIG = lorakit.LoraConfig(targets=("0", "2"), rank=4, alpha=8)


def adapted(kind: str) -> nn.Sequential:
    model = quantized_mlp(kind)
    lorakit.inject(model, CONFIG)
    randomise_lora(model)
    return model


def inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, IN, generator=torch.Generator().manual_seed(1))


def expected_layer(layer: nn.Module, base_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """base(x) + s * B(A x), the adapter in float32, cast back to the base output's dtype."""
    lora = layer.lora["default"]
    delta = lora.scaling * (x.float() @ lora.lora_A.t() @ lora.lora_B.t())
    return base_out + delta.to(base_out.dtype)


def test_issue_reproduction_runs():
    q = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    q.load_state_dict(torch.nn.Linear(64, 32).state_dict())
    q = q.to("cpu")
    m = torch.nn.Sequential(q)
    lorakit.inject(m, lorakit.LoraConfig(targets=["0"], rank=4))
    assert m(torch.randn(5, 64)).shape == (5, 32)
    lora = m[0].lora["default"]
    assert (lora.in_features, lora.out_features) == (64, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_output_is_quantized_base_plus_low_rank(kind):
    model = quantized_mlp(kind)
    x = inputs()
    with torch.no_grad():
        base_out = model[0](x)
    lorakit.inject(model, CONFIG)
    randomise_lora(model)
    layer = model[0]
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected_layer(layer, base_out, x), rtol=1e-5, atol=1e-5)
    assert got.dtype == x.dtype


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapters_get_gradients(kind):
    model = adapted(kind)
    x = inputs().requires_grad_(True)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert x.grad is not None and x.grad.abs().sum() > 0  # flows on to earlier layers


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_after_an_evaluation_are_the_same(kind):
    """bitsandbytes repacks 4-bit codes for CPU inference into a layout without backward;
    adapted layers never take it, so an eval pass does not change the next train step."""
    model, x = adapted(kind), inputs()

    def input_grad() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        model(xr).sum().backward()
        return xr.grad

    before = input_grad()
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    torch.testing.assert_close(input_grad(), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_dtype_follows_config_never_the_codes(kind):
    model = quantized_mlp(kind)
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",), dtype=None))
    assert model[0].lora["default"].lora_A.dtype == torch.float32
    model = quantized_mlp(kind)
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",), dtype=torch.bfloat16))
    assert model[0].lora["default"].lora_A.dtype == torch.bfloat16
    assert model(inputs()).dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    model = adapted(kind)
    x = inputs()
    with torch.no_grad():
        want = model(x)
    lorakit.save_adapter(model, tmp_path)
    fresh = quantized_mlp(kind)
    lorakit.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_from_quantized_base_loads_into_full_base(kind, tmp_path):
    model = adapted(kind)
    lorakit.save_adapter(model, tmp_path)
    full = full_mlp()
    lorakit.load_adapter(full, tmp_path)
    quantized_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    full_state = {k: v for k, v in full.state_dict().items() if "lora_" in k}
    assert quantized_state.keys() == full_state.keys()
    for key, value in quantized_state.items():
        torch.testing.assert_close(full_state[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_from_full_base_loads_into_quantized_base(kind, tmp_path):
    full = full_mlp()
    lorakit.inject(full, CONFIG)
    randomise_lora(full)
    lorakit.save_adapter(full, tmp_path)
    model = quantized_mlp(kind)
    lorakit.load_adapter(model, tmp_path)
    a_full, a_quant = full[0].lora["default"].lora_A, model[0].lora["default"].lora_A
    torch.testing.assert_close(a_quant, a_full, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_gives_back_the_quantized_layer(kind):
    model = adapted(kind)
    x = inputs()
    lorakit.unload(model)
    assert type(model[0]) is type(quantized_mlp(kind)[0])
    with torch.no_grad():
        torch.testing.assert_close(model(x), quantized_mlp(kind)(x), rtol=0, atol=0)


def test_disabled_computes_the_quantized_base():
    model, x = adapted("nf4"), inputs()
    with torch.no_grad(), lorakit.disabled(model):
        got = model(x)
    with torch.no_grad():
        torch.testing.assert_close(got, quantized_mlp("nf4")(x), rtol=0, atol=0)


class PackedLinear(nn.Linear):
    """Another library's quantized layer: a packed uint8 weight, its own forward."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        codes = torch.zeros(in_features * out_features // 2, 1, dtype=torch.uint8)
        self.weight = nn.Parameter(codes, requires_grad=False)


class Int8Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        codes = torch.zeros(out_features, in_features, dtype=torch.int8)
        self.weight = nn.Parameter(codes, requires_grad=False)


@pytest.mark.parametrize("cls", [PackedLinear, Int8Linear])
@pytest.mark.parametrize("targets", [("0",), "all-linear"])
def test_unknown_quantized_linear_is_refused_at_inject(cls, targets):
    model = nn.Sequential(cls(64, 32))
    with pytest.raises(UnsupportedLayerError, match=rf"type {cls.__name__}: its weight is"):
        lorakit.inject(model, lorakit.LoraConfig(targets=targets))
    assert type(model[0]) is cls


def test_import_lorakit_does_not_import_bitsandbytes():
    code = "import sys, lorakit; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "fp4"])
def test_dequantized_weight_is_what_the_4bit_layer_computes_with(kind):
    layer, x = quantized_mlp(kind)[0], inputs()
    with torch.no_grad():
        want = layer(x)
        got = nn.functional.linear(x, dequantized_weight(layer), layer.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_weight_is_near_the_full_one(kind):
    full = full_mlp()[0].weight.detach()
    got = dequantized_weight(quantized_mlp(kind)[0])
    assert got.shape == full.shape and got.dtype == torch.float32
    assert (got - full).norm() < 0.15 * full.norm()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_parameter_counts_are_the_layers_not_the_packed_bytes(kind):
    model = quantized_mlp(kind)
    report = lorakit.inject(model, CONFIG)
    full = sum(p.numel() for p in full_mlp().parameters())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert (report.trainable, report.total) == (lora, full + lora)
