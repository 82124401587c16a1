"""The seed API (Edifice.Meta.LoRA in PyTorch form): build, lora_delta, wrap, output_size."""

from __future__ import annotations

import pytest
import torch
from conftest import LayerCase, randomise_lora
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterError, ConfigError, LoRA, LoraLayer, UnsupportedLayerError


def test_build_defaults_are_the_seeds():
    lora = lorakit.build(input_size=6, output_size=5)
    assert isinstance(lora, LoRA)
    assert (lora.rank, lora.alpha, lora.scaling) == (8, 16.0, 2.0)
    assert lora.lora_A.shape == (8, 6) and lora.lora_B.shape == (5, 8)
    # Edifice's init: A ~ N(0, 0.02), B = 0
    assert torch.count_nonzero(lora.lora_B) == 0
    assert lora.lora_A.std().item() == pytest.approx(0.02, rel=0.5)


@pytest.mark.parametrize("leading", [(), (3,), (2, 4), (2, 3, 4)])
def test_fresh_build_outputs_exact_zeros_of_output_size(leading):
    lora = lorakit.build(input_size=6, output_size=5, rank=2, alpha=4.0)
    y = lora(torch.randn(*leading, 6))
    assert y.shape == (*leading, 5)
    assert torch.equal(y, torch.zeros(*leading, 5))


def test_lora_delta_is_the_same_module_as_build():
    torch.manual_seed(0)
    a = lorakit.lora_delta(6, 5, rank=3, alpha=9.0)
    torch.manual_seed(0)
    b = lorakit.build(input_size=6, output_size=5, rank=3, alpha=9.0)
    assert a.scaling == b.scaling == 3.0
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_build_computes_scaled_low_rank_product():
    lora = lorakit.build(input_size=6, output_size=5, rank=2, alpha=3.0)
    randomise_lora(lora)
    x = torch.randn(4, 6)
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    torch.testing.assert_close(lora(x), (3.0 / 2) * (x @ A.T) @ B.T)


def test_wrap_linear_equals_original_plus_scaled_delta_by_hand():
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    original = layer(x).detach()
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    wrapped = lorakit.wrap(layer, rank=4, alpha=6.0)
    assert wrapped is layer and isinstance(layer, LoraLayer) and isinstance(layer, nn.Linear)
    assert torch.equal(layer(x), original)  # fresh: exact no-op
    with torch.no_grad():
        layer.lora["lora"].lora_B.normal_()
    A, B = layer.lora["lora"].lora_A.detach(), layer.lora["lora"].lora_B.detach()
    by_hand = x @ W.T + b + (6.0 / 4) * ((x @ A.T) @ B.T)
    torch.testing.assert_close(layer(x), by_hand)
    torch.testing.assert_close(layer(x), original + (6.0 / 4) * (x @ A.T) @ B.T)


def test_wrap_defaults_and_freezing():
    layer = lorakit.wrap(nn.Linear(6, 5))
    assert tuple(layer.lora) == ("lora",)
    adapter = layer.lora["lora"]
    assert (adapter.rank, adapter.alpha) == (8, 16.0)
    assert adapter.lora_A.shape == (8, 6) and adapter.lora_B.shape == (5, 8)  # sizes from layer
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert adapter.lora_A.requires_grad and adapter.lora_B.requires_grad


def test_wrap_table(layer_case: LayerCase):
    layer, x = layer_case.make(), layer_case.make_input()
    expected = layer(x)
    lorakit.wrap(layer, rank=2)
    assert isinstance(layer, layer_case.base_type)
    assert torch.equal(layer(x), expected)
    channels_first = isinstance(layer, nn.modules.conv._ConvNd)  # (N, C_out, ...)
    assert lorakit.output_size(layer) == expected.shape[1 if channels_first else -1]


def test_wrap_a_second_adapter_and_refuse_a_duplicate():
    layer = lorakit.wrap(nn.Linear(6, 5))
    lorakit.wrap(layer, name="other", rank=2)
    assert tuple(layer.lora) == ("lora", "other")
    assert type(layer) is lorakit.LoRALinear  # never wrapped twice
    with pytest.raises(AdapterError, match="adapter 'lora' already exists"):
        lorakit.wrap(layer)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.LayerNorm(4), "cannot adapt a layer of type LayerNorm"),
        (nn.ReLU(), "cannot adapt a layer of type ReLU"),
    ],
)
def test_wrap_unsupported_layer_raises(layer, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        lorakit.wrap(layer)
    assert not isinstance(layer, LoraLayer)


@pytest.mark.parametrize("name", ["", "../x", "a.b"])
def test_bad_names_raise(name):
    with pytest.raises(AdapterError, match="adapter_name must be a plain identifier"):
        lorakit.wrap(nn.Linear(2, 2), name=name)
    with pytest.raises(AdapterError, match="adapter_name must be a plain identifier"):
        lorakit.build(input_size=2, output_size=2, name=name)


def test_output_size_from_lora_layer_and_options():
    assert lorakit.output_size(lorakit.build(input_size=6, output_size=5)) == 5
    assert lorakit.output_size(lorakit.lora_delta(3, 7)) == 7
    assert lorakit.output_size(lorakit.wrap(nn.Linear(6, 5))) == 5
    assert lorakit.output_size(lorakit.wrap(Conv1D(5, 6))) == 5  # weight stored (in, out)
    assert lorakit.output_size(lorakit.wrap(nn.Embedding(20, 6))) == 6
    assert lorakit.output_size(lorakit.wrap(nn.Conv2d(3, 4, 3))) == 4
    assert lorakit.output_size(output_size=12) == 12


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: lorakit.build(), ConfigError, "input_size is required, got None"),
        (lambda: lorakit.build(input_size=4), ConfigError, "output_size is required, got None"),
        (lambda: lorakit.build(output_size=4), ConfigError, "input_size is required"),
        (
            lambda: lorakit.build(input_size=0, output_size=4),
            ConfigError,
            "input_size must be a positive integer, got 0",
        ),
        (
            lambda: lorakit.build(input_size=4, output_size=2.0),
            ConfigError,
            r"output_size must be a positive integer, got 2\.0",
        ),
        (
            lambda: lorakit.build(input_size=4, output_size=4, rank=0),
            ConfigError,
            "rank must be a positive integer, got 0",
        ),
        (
            lambda: lorakit.build(input_size=4, output_size=4, alpha=float("inf")),
            ConfigError,
            "alpha must be a positive finite number, got inf",
        ),
        (
            lambda: lorakit.lora_delta(4, 4, rank=True),
            ConfigError,
            "rank must be a positive integer, got True",
        ),
        (
            lambda: lorakit.wrap(nn.Linear(2, 2), rank=-1),
            ConfigError,
            "rank must be a positive integer, got -1",
        ),
        (
            lambda: lorakit.wrap(nn.Linear(2, 2), dropout=1.0),
            ConfigError,
            r"dropout must be a number in \[0, 1\), got 1\.0",
        ),
        (lambda: lorakit.output_size(), ConfigError, "output_size is required"),
        (
            lambda: lorakit.output_size(output_size=0),
            ConfigError,
            "output_size must be a positive integer, got 0",
        ),
        (
            lambda: lorakit.output_size(nn.Linear(2, 3)),
            ConfigError,
            "layer must be a LoRA module or LoRA layer, got Linear",
        ),
    ],
)
def test_bad_input_raises_naming_the_option(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_wrap_with_bad_options_leaves_layer_untouched():
    layer = nn.Linear(2, 2)
    with pytest.raises(ConfigError):
        lorakit.wrap(layer, alpha=0)
    assert type(layer) is nn.Linear and layer.weight.requires_grad
