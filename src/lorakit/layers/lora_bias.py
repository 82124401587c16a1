"""PEFT's `lora_bias`: a trainable bias b on B, so an adapter adds s * (B A x + b).

PEFT allows it on Linear, GPT-2 Conv1D and Conv1d/2d/3d layers (grouped too) and on
bitsandbytes' quantized linears, refuses it on embeddings (and with DoRA, in the config).
Merging adds s * b to the base layer's bias; a base without a bias cannot take it, so PEFT
warns when such an adapter is added and refuses the merge: lorakit does the same.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import UnsupportedLayerError
from ..functional import merged_weight

if TYPE_CHECKING:  # base.py imports this module
    from .base import LoraLayer


def check_lora_bias_layer(layer: LoraLayer) -> None:
    """Refuse lora_bias where PEFT does (embeddings); warn where it cannot be merged."""
    if layer.is_embedding:
        raise UnsupportedLayerError(
            f"lora_bias=True is not supported on {type(layer).__name__} layers (PEFT refuses "
            "it on embeddings too); lora_bias supports Linear, GPT-2 Conv1D and Conv1d/2d/3d"
        )
    if getattr(layer, "bias", None) is None:
        warnings.warn(
            f"lora_bias=True on a {type(layer).__name__} without a bias: the adapter works, "
            "but it cannot be merged (the base has no bias to add it to)",
            UserWarning,
            stacklevel=4,
        )


def no_bias_refusal(layer: LoraLayer, adapter_name: str) -> str | None:
    """Why adapter `adapter_name`'s lora_bias cannot be merged into `layer` (None: it can)."""
    if layer.lora[adapter_name].lora_bias is None or getattr(layer, "bias", None) is not None:
        return None
    return (
        f"cannot merge adapter {adapter_name!r} into {type(layer).__name__}: it has "
        "lora_bias=True and the base layer has no bias to add it to (PEFT refuses this "
        "merge too); keep the adapter unmerged"
    )


def bias_step(layer: LoraLayer, bias: Tensor, name: str, sign: int = 1) -> Tensor | None:
    """`bias` plus (sign -1: minus) s * b of adapter `name`, or None when it has no lora_bias."""
    adapter = layer.lora[name]
    if adapter.lora_bias is None:
        return None
    with torch.no_grad():
        return merged_weight(bias, adapter.lora_bias * adapter.scaling, sign)


def with_biases(layer: LoraLayer, bias: Tensor, names: tuple[str, ...]) -> Tensor:
    """`bias` (unmerged) with the lora biases of `names` added in order, as `merge` does."""
    for name in names:
        new = bias_step(layer, bias, name)
        bias = bias if new is None else new
    return bias
