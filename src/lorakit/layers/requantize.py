"""Quantizing a float weight the way a given bitsandbytes layer quantized its own.

Two users: the re-quantizing merge (`lorakit.merge_and_requantize`: W + s B A written back
into the layer's 4-bit / 8-bit codes) and LoftQ (`lorakit.loftq`: Q(W - s B A) for the
alternating steps). Both need the layer's settings (NF4 / FP4, block size, double
quantization, storage dtype; 8-bit rows), not bitsandbytes' defaults, so that the result is
what the layer itself would hold and compute with.
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import (
    dequantize_4bit,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    quantize_4bit,
)
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .dequantize import original_dtype


def _codes(module: nn.Module, weight: Tensor) -> tuple[Tensor, object]:
    """(codes, state) of float `weight` (out, in) quantized with `module`'s settings: a
    bitsandbytes QuantState for 4 bits, the per-row scales for 8 bits."""
    params = module.weight
    device = params.device
    if isinstance(params, bnb.nn.Params4bit):
        return quantize_4bit(
            weight.to(device=device, dtype=original_dtype(module)).contiguous(),
            blocksize=params.blocksize,
            compress_statistics=params.compress_statistics,
            quant_type=params.quant_type,
            quant_storage=params.quant_storage,
        )
    if isinstance(params, bnb.nn.Int8Params):
        codes, scales, _ = int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16))
        return codes, scales
    raise UnsupportedLayerError(
        f"{type(module).__name__} holds no bitsandbytes 4-bit or 8-bit weight "
        f"({type(params).__name__}); only Linear4bit and Linear8bitLt can be re-quantized"
    )


def roundtrip(module: nn.Module, weight: Tensor) -> Tensor:
    """dequant(quant(`weight`)) in float32, quantized as `module`'s weight is: the weight the
    layer would compute with if it held `weight`. `module` is left unchanged."""
    codes, state = _codes(module, weight)
    if isinstance(module.weight, bnb.nn.Params4bit):
        return dequantize_4bit(codes, state).float()
    return int8_vectorwise_dequant(codes, state).float()


def requantize_(module: nn.Module, weight: Tensor) -> None:
    """Replace `module`'s codes, in place, by float `weight` (out, in) quantized with the
    layer's settings; afterwards the layer computes with `roundtrip(module, weight)`."""
    codes, state = _codes(module, weight)
    params = module.weight
    if isinstance(params, bnb.nn.Params4bit):
        params.data, params.quant_state = codes, state
        module.quant_state = state
        return
    params.data = codes
    params.CB, params.SCB = codes, state  # the layer moves these to its state on its forward
    module.state.CB, module.state.SCB = codes, state
