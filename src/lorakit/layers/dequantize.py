"""Full-precision weights of bitsandbytes' quantized linears: what merging needs.

bitsandbytes keeps a 4-bit weight as packed codes (shape (out * in / 2, 1)) plus a
`quant_state` (block scales, the original shape and dtype), and an 8-bit weight as int8 rows
plus per-row scales (`SCB`). Both come back to float32 (out, in) here. On a CPU with
AVX512-BF16, bitsandbytes repacks a 4-bit weight in place during inference (eval mode, no
grad); that layout is undone first (as bitsandbytes' own state-dict saving does), so the codes
read are the layer's.

That repacking also breaks training (bitsandbytes 0.50): a repacked layer keeps its layout
when training resumes, and its kernel has no backward, so the gradient to its input is
silently dropped (or an in-place bias add fails). `keep_trainable_layout` turns it off.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant
from torch import Tensor, nn


def original_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weight had before it was quantized (float32 when unknown)."""
    weight = module.weight
    if weight.dtype.is_floating_point:
        return weight.dtype
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return getattr(state, "original_dtype", None) or state.dtype
    return torch.float32  # 8-bit rows do not record it


def _unpacked_4bit(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking of `module.weight`, in place."""
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )


def keep_trainable_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit layer in the layout its backward supports: undo a CPU
    inference repacking and turn it off for this layer (its CPU inference then runs the
    training kernel: correct gradients after an evaluation, at some inference speed)."""
    if isinstance(getattr(module, "weight", None), bnb.nn.Params4bit):
        module.support_avx512bf16_for_cpu = False
        if module.weight.quant_state is not None:
            _unpacked_4bit(module)


def dequantized_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) weight a bitsandbytes Linear4bit / Linear8bitLt computes with."""
    weight = module.weight
    if weight.dtype.is_floating_point:  # not quantized yet (or 8-bit with fp16 weights)
        return weight.detach().float()
    if isinstance(weight, bnb.nn.Params4bit):
        _unpacked_4bit(module)
        weight = module.weight
        return dequantize_4bit(weight.data, weight.quant_state).float()
    scales = getattr(weight, "SCB", None)
    if scales is None:  # after the first forward the scales live in the layer's state
        scales = module.state.SCB
    return int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()


def full_precision_linear(
    module: nn.Module, weight: Tensor | None = None, bias: Tensor | None = None
) -> nn.Linear:
    """A plain `nn.Linear` in place of bitsandbytes layer `module`: `weight` (default: the
    layer's own, dequantized) and `bias` (default: the layer's own; given, it may add a bias
    where the layer had none), stored in the dtype from before quantization. The weight is
    frozen (a base weight); a bias keeps the layer's bias trainability, and the train mode."""
    with torch.no_grad():
        weight = dequantized_weight(module) if weight is None else weight
        bias = module.bias if bias is None else bias
        linear = nn.Linear(
            module.in_features, module.out_features, bias is not None,
            device=weight.device, dtype=original_dtype(module),
        )  # fmt: skip
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
            own = module.bias
            linear.bias.requires_grad_(own is not None and own.requires_grad)
    linear.weight.requires_grad_(False)
    return linear.train(module.training)


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes Linear4bit / Linear8bitLt left in `model` by a plain
    `nn.Linear` (`full_precision_linear`), and drop transformers' record of the quantization
    (`hf_quantizer`, `config.quantization_config`), so `save_pretrained` writes a plain
    full-precision model. In place; returns the paths replaced.

    (transformers' own `model.dequantize()` fails when no quantized layer is left, as after
    `merge_and_unload` of an adapter on every linear layer.)
    """
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    paths = [name for name, m in model.named_modules() if isinstance(m, quantized)]
    for path in paths:
        model.set_submodule(path, full_precision_linear(model.get_submodule(path)))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return paths
