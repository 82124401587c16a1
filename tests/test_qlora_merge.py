"""Merging adapters on a quantized base: refused in place, full precision when unloaded."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import randomise_lora
from qlora_models import IN, KINDS, quantized_mlp
from torch import nn

import lorakit
from lorakit.errors import MergeError
from lorakit.layers.dequantize import dequantized_weight

CONFIG = lorakit.LoraConfig(targets=("0", "2"), rank=4, alpha=8)
BITS = {kind: 8 if kind == "int8" else 4 for kind in KINDS}


def adapted(kind: str) -> nn.Sequential:
    model = quantized_mlp(kind)
    lorakit.inject(model, CONFIG)
    randomise_lora(model)
    return model


def inputs() -> torch.Tensor:
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_in_place_is_refused_and_changes_nothing(kind):
    model, x = adapted(kind), inputs()
    with torch.no_grad():
        before = model(x)
    with pytest.raises(MergeError, match=rf"layer '0'.*{BITS[kind]}-bit codes.*merge_and_unload"):
        lorakit.merge(model)
    assert all(layer.lora_merged == () for _, layer in lorakit.lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_layer_merge_is_refused_too():
    layer = adapted("nf4")[0]
    with pytest.raises(MergeError, match="cannot merge adapter 'default' into LoRALinear4bit"):
        layer.merge()
    layer.merge(())  # nothing asked: nothing to refuse


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_full_precision_linears(kind):
    model, x = adapted(kind), inputs()
    wants = []
    for i in (0, 2):
        layer = model[i]
        delta = layer.delta_weight("default").float()
        wants.append((dequantized_weight(layer) + delta, layer.bias))
    with torch.no_grad():
        adapted_out = model(x)
    merged = lorakit.merge_and_unload(model)
    for i, (weight, bias) in zip((0, 2), wants):
        assert type(merged[i]) is nn.Linear
        assert merged[i].weight.dtype == torch.float32 and not merged[i].weight.requires_grad
        torch.testing.assert_close(merged[i].weight, weight, rtol=1e-6, atol=1e-6)
        if bias is not None:
            torch.testing.assert_close(merged[i].bias, bias.float())
    assert not list(lorakit.lora_layers(merged))
    with torch.no_grad():  # the quantized forward rounds its compute; int8 also its inputs
        tolerance = 0.05 if kind in ("int8", "nf4-bf16", "fp4-bf16") else 1e-4
        torch.testing.assert_close(merged(x), adapted_out, rtol=tolerance, atol=tolerance)


def test_merge_and_unload_keeps_the_original_dtype():
    full = nn.Linear(IN, 32).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(IN, 32, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(full.weight.data, quant_type="nf4", module=layer)
    layer.bias = nn.Parameter(full.bias.data)
    model = nn.Sequential(layer.to("cpu"))
    lorakit.inject(model, lorakit.LoraConfig(targets=("0",)))
    merged = lorakit.merge_and_unload(model)
    assert merged[0].weight.dtype == merged[0].bias.dtype == torch.bfloat16


def test_merge_and_unload_after_cpu_inference_repacking():
    """bitsandbytes may repack 4-bit codes for CPU inference; the merge reads them back.

    Repacking stores the block scales in bfloat16, so the weight read back is the original
    one to bfloat16's precision in the scales (relative 2**-8), not to the last bit."""
    model, x = quantized_mlp("nf4").eval(), inputs()
    with torch.no_grad():
        model(x)  # eval + no grad: where bitsandbytes repacks (on AVX512-BF16 CPUs)
    lorakit.inject(model, CONFIG)
    randomise_lora(model)
    want = dequantized_weight(quantized_mlp("nf4")[0]) + model[0].delta_weight("default")
    merged = lorakit.merge_and_unload(model)
    torch.testing.assert_close(merged[0].weight, want, rtol=1e-2, atol=1e-3)


def test_merge_and_unload_of_a_single_quantized_layer():
    model = adapted("nf4")
    layer, x = model[0], inputs()
    want = nn.functional.linear(
        x, dequantized_weight(layer) + layer.delta_weight("default"), layer.bias
    )
    plain = lorakit.merge_and_unload(layer)
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
