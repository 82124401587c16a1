"""LoftQ initialisation: adapters fitted to the base weight's quantization error."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from qlora_models import IN, KINDS, full_mlp, quantized_mlp
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.errors import ConfigError, UnsupportedLayerError
from lorakit.layers.dequantize import dequantized_weight
from lorakit.loftq import loftq_factors, nf4_roundtrip

CONFIG = lorakit.LoraConfig(targets=("0", "2"), rank=8, alpha=16)


def grid(w: torch.Tensor) -> torch.Tensor:
    """A coarse stand-in quantizer: round to multiples of 1/8."""
    return (w * 8).round() / 8


# scale = alpha / rank: the factors must absorb it (PEFT's LoftQ is exact only for scale 1)
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0, 16.0])
def test_factors_are_the_rank_r_svd_of_the_error_over_the_scale(scale):
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    f = loftq_factors(weight, grid, rank=4, scale=scale)
    u, s, vh = torch.linalg.svd(weight - grid(weight))
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(scale * f.lora_B @ f.lora_A, best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f.quantized, grid(weight))
    assert f.lora_A.shape == (4, 32) and f.lora_B.shape == (48, 4)


def test_more_iterations_do_not_raise_the_error():
    weight = full_mlp()[0].weight.detach()
    errors = []
    for iters in (1, 2, 5):
        f = loftq_factors(weight, nf4_roundtrip, rank=8, scale=2.0, iters=iters)
        errors.append(float((weight - f.quantized - 2.0 * f.lora_B @ f.lora_A).norm()))
    assert errors[2] <= errors[1] * 1.001 <= errors[0] * 1.002, errors


FLOAT_LAYERS = {
    "linear": lambda: nn.Linear(IN, 32),
    "gpt2-conv1d": lambda: Conv1D(32, IN),  # weight stored (in, out)
}


@pytest.mark.parametrize("make", FLOAT_LAYERS.values(), ids=FLOAT_LAYERS)
def test_inject_on_a_float_layer_quantizes_its_weight_and_fits_the_error(make):
    torch.manual_seed(0)
    model = nn.Sequential(make())
    full = model[0].weight.detach().clone()
    x = torch.randn(16, IN)
    with torch.no_grad():
        want = model(x)
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",), rank=8, init="loftq"))
    layer = model[0]
    transposed = layer.weight_transposed
    nf4 = nf4_roundtrip(full.T if transposed else full)
    torch.testing.assert_close(layer.weight, nf4.T if transposed else nf4, rtol=0, atol=0)
    with torch.no_grad():
        adapted = model(x)
        with lorakit.disabled(model):
            quantized_only = model(x)
    # the NF4 base alone is off by its rounding; the adapter takes a good part of it back
    assert (adapted - want).norm() < 0.8 * (quantized_only - want).norm()
    adapter = layer.lora["default"]
    assert adapter.lora_B.requires_grad and adapter.lora_B.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_loftq_init_on_a_quantized_model_lowers_the_weight_error(kind):
    full, model = full_mlp(), quantized_mlp(kind)
    codes = {i: dequantized_weight(model[i]) for i in (0, 2)}
    lorakit.inject(model, CONFIG)
    errors = lorakit.loftq_init(model, full.state_dict())
    assert set(errors) == {"0", "2"}
    for i in (0, 2):
        name, layer = str(i), model[i]
        w = full[i].weight.detach()
        assert errors[name].after < 0.9 * errors[name].before, errors
        # one iteration fits the adapter to the layer's own codes: they stay as they were
        torch.testing.assert_close(dequantized_weight(layer), codes[i], rtol=0, atol=0)
        approx = dequantized_weight(layer) + layer.delta_weight("default").float()
        assert float((w - approx).norm() / w.norm()) == pytest.approx(errors[name].after)
        assert errors[name].before == pytest.approx(float((w - codes[i]).norm() / w.norm()))


def test_iterations_rewrite_the_codes_and_lower_the_error_further():
    full = full_mlp()
    once, more = quantized_mlp("nf4"), quantized_mlp("nf4")
    lorakit.inject(once, CONFIG)
    lorakit.inject(more, CONFIG)
    one = lorakit.loftq_init(once, full.state_dict(), iters=1)
    five = lorakit.loftq_init(more, full.state_dict(), iters=5)
    assert not torch.equal(dequantized_weight(more[0]), dequantized_weight(once[0]))
    assert five["0"].after <= one["0"].after * 1.001
    assert isinstance(more[0].weight, bnb.nn.Params4bit) and more[0].weight.dtype == torch.uint8


def _quantized_with_adapter() -> nn.Sequential:
    model = quantized_mlp("nf4")
    lorakit.inject(model, CONFIG)
    return model


ERRORS = {
    "missing weight": ({"0.weight": torch.zeros(128, IN)}, 1, "has no '2.weight'"),
    "wrong shape": (
        {"0.weight": torch.zeros(IN, IN), "2.weight": torch.zeros(64, 128)}, 1,
        r"full_weights\['0.weight'\] has shape \(64, 64\), layer '0' has \(128, 64\)",
    ),
    "zero iterations": ({}, 0, "loftq iters must be a positive integer, got 0"),
}  # fmt: skip


@pytest.mark.parametrize(("weights", "iters", "message"), ERRORS.values(), ids=ERRORS)
def test_loftq_init_errors_name_the_fault_and_change_nothing(weights, iters, message):
    model = _quantized_with_adapter()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=message):
        lorakit.loftq_init(model, weights, iters=iters)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loftq_init_without_a_quantized_layer():
    model = nn.Sequential(nn.Linear(IN, 8))
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",)))
    with pytest.raises(ConfigError, match="no quantized layer holds adapter 'default'"):
        lorakit.loftq_init(model, model.state_dict())


INJECT_ERRORS = {
    "quantized base": (
        lambda: quantized_mlp("nf4"), {}, ConfigError,
        "init='loftq' on LoRALinear4bit: its weight is quantized already.*lorakit.loftq_init",
    ),
    "embedding": (
        lambda: nn.Sequential(nn.Embedding(10, IN)), {}, UnsupportedLayerError,
        "init='loftq' fits a LoRA adapter on a Linear layer's .* not Embedding",
    ),
    "dora": (
        lambda: nn.Sequential(nn.Linear(IN, 8)), {"use_dora": True}, UnsupportedLayerError,
        "not DoRA",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("make", "extra", "error", "message"), INJECT_ERRORS.values(),
                         ids=INJECT_ERRORS)  # fmt: skip
def test_inject_with_loftq_refuses_what_it_cannot_fit(make, extra, error, message):
    model = make()
    before = [p.detach().clone() for p in model.parameters()]
    config = lorakit.LoraConfig(targets=("0",), init="loftq", **extra)
    with pytest.raises(error, match=message):
        lorakit.inject(model, config)
    assert not list(lorakit.lora_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_config_accepts_loftq_and_still_lists_the_choices():
    assert lorakit.LoraConfig(init="loftq").init == "loftq"
    with pytest.raises(ConfigError, match=r"init must be one of \[.*'loftq'.*\].*, got 'svd'"):
        lorakit.LoraConfig(init="svd")
