"""`merge_and_requantize`: the opt-in merge that rounds W + s B A back into 4-bit / 8-bit codes."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import randomise_lora
from qlora_models import IN, KINDS, quantized_mlp
from torch import nn

import lorakit
from lorakit.errors import MergeError, UnsupportedLayerError
from lorakit.layers.dequantize import dequantized_weight
from lorakit.layers.requantize import requantize_, roundtrip

CONFIG = lorakit.LoraConfig(targets=("0", "2"), rank=4, alpha=8)
BASE_CLASS = {kind: bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit for kind in KINDS}


def adapted(kind: str, std: float = 0.1) -> nn.Sequential:
    model = quantized_mlp(kind)
    lorakit.inject(model, CONFIG)
    randomise_lora(model, std=std)
    return model


def wanted(model: nn.Sequential) -> dict[str, torch.Tensor]:
    """dequant(W) + s B A of each adapted layer: what the re-quantized codes approximate."""
    with torch.no_grad():
        return {
            name: dequantized_weight(layer) + layer.delta_weight("default").float()
            for name, layer in lorakit.lora_layers(model)
        }


@pytest.mark.parametrize("kind", KINDS)
def test_requantized_layers_hold_the_rounded_merged_weight(kind):
    model = adapted(kind)
    want = wanted(model)
    rounded = {name: roundtrip(model.get_submodule(name), w) for name, w in want.items()}
    errors = lorakit.merge_and_requantize(model)
    assert set(errors) == {"0", "2"}
    assert not list(lorakit.lora_layers(model))
    x = torch.randn(3, IN)
    for name, weight in rounded.items():
        layer = model.get_submodule(name)
        assert type(layer) is BASE_CLASS[kind]
        torch.testing.assert_close(dequantized_weight(layer), weight, rtol=0, atol=0)
        delta = want[name] - dequantized_weight(quantized_mlp(kind).get_submodule(name))
        lost = (weight - want[name]).norm() / delta.norm()
        assert errors[name] == pytest.approx(float(lost), rel=1e-4)
    with torch.no_grad():
        out = model(x)  # the re-quantized model runs its own quantized forward
    assert out.shape == (3, 64) and torch.isfinite(out).all()


# (adapter std, bounds on the share of the delta lost): a large delta survives the rounding,
# a small one (below one quantization step, as after a short finetune) mostly does not.
ROUNDING = {"large-delta": (0.1, 0.0, 0.5), "small-delta": (0.003, 0.5, 2.0)}


@pytest.mark.parametrize(("std", "low", "high"), ROUNDING.values(), ids=ROUNDING)
def test_rounding_error_is_reported_as_the_share_of_the_delta_lost(std, low, high):
    errors = lorakit.merge_and_requantize(adapted("nf4", std))
    assert all(low <= e <= high for e in errors.values()), errors


def test_zero_adapter_reports_no_error():
    model = quantized_mlp("nf4")
    lorakit.inject(model, CONFIG)  # B starts at zero
    assert lorakit.merge_and_requantize(model) == {"0": 0.0, "2": 0.0}


def test_full_precision_layers_merge_as_usual():
    model = nn.Sequential(quantized_mlp("nf4")[0], nn.GELU(), nn.Linear(128, 8))
    lorakit.inject(model, lorakit.LoraConfig(targets=("0", "2"), rank=2))
    randomise_lora(model)
    want = model[2].weight + model[2].delta_weight("default")
    assert list(lorakit.merge_and_requantize(model)) == ["0"]
    assert type(model[2]) is nn.Linear
    torch.testing.assert_close(model[2].weight, want)


def test_non_finite_adapter_is_refused_before_any_write():
    model = adapted("nf4")
    codes = model[0].weight.data.clone()
    with torch.no_grad():
        model[2].lora["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(MergeError, match="adapter 'default' of layer '2' holds NaN or inf"):
        lorakit.merge_and_requantize(model)
    assert torch.equal(model[0].weight.data, codes) and len(list(lorakit.lora_layers(model))) == 2


def test_merge_in_place_still_refused_and_points_to_the_opt_in():
    with pytest.raises(MergeError, match="accepting the rounding.*merge_and_requantize"):
        lorakit.merge(adapted("nf4"))


def test_requantizing_a_float_layer_names_the_type():
    with pytest.raises(UnsupportedLayerError, match="Linear holds no bitsandbytes 4-bit or 8-bit"):
        requantize_(nn.Linear(4, 4), torch.zeros(4, 4))
