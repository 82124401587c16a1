"""LoRA over bitsandbytes' quantized linears (QLoRA): `Linear4bit` (NF4 / FP4, double
quantization, any compute dtype) and `Linear8bitLt`.

    y = base(x) + sum_a s_a * B_a(A_a(drop(x)))

The base runs its own quantized forward (bitsandbytes dequantizes block by block and has a
backward through the frozen codes); the adapters compute in their own dtype (float32 unless
the config says otherwise, as PEFT), x cast to it and the result cast back to the base
output's dtype. Only the adapters train: the codes have no gradient.

The sizes come from `in_features` / `out_features`: the packed 4-bit weight's shape is
(out * in / 2, 1). Merging in place is refused (rounding W + s B A back to 4-bit or 8-bit
codes would lose most of the adapter); `lorakit.merge_and_unload` instead gives a
full-precision `nn.Linear` (see `merged_linear`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import bitsandbytes as bnb
import torch
from torch import nn

from ..config import LoraConfig
from ..errors import MergeError
from .base import LoraLayer
from .dequantize import dequantized_weight, full_precision_linear, keep_trainable_layout
from .linear import LinearLoraMixin
from .lora import LoRA
from .requantize import requantize_


class QuantizedLinearLoraMixin(LinearLoraMixin):
    """Mixin: LoRA on a quantized Linear; the plain path (4-bit layers: the fused one where it
    applies, `lorakit.fused_quantized`)."""

    is_quantized: ClassVar[bool] = True
    supports_dora = False  # DoRA's norms need the float W: not reproduced on codes yet
    bits: ClassVar[int]

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_features, self.out_features, ()

    def add_adapter(self, name: str, config: LoraConfig) -> LoRA:
        if config.dtype is None:  # "follow the base": its codes are integers, use float32
            config = dataclasses.replace(config, dtype=torch.float32)
        return super().add_adapter(name, config)

    forward = LoraLayer.forward  # base's quantized forward + the adapters' deltas

    def merge(self, names: tuple[str, ...] | None = None, keep_original: bool = True) -> None:
        """Refused for anything not merged yet: see `check_mergeable`."""
        wanted = self.lora_active if names is None else names
        todo = [n for n in wanted if n not in self.lora_merged]
        if todo:
            raise MergeError(self.merge_refusal(todo[0]))

    def merge_refusal(self, adapter_name: str) -> str:
        """Why adapter `adapter_name` cannot be merged into this layer in place."""
        return (
            f"cannot merge adapter {adapter_name!r} into {type(self).__name__} in place: its "
            f"weight is stored as {self.bits}-bit codes, and rounding W + s*B*A back to them "
            "would lose most of the adapter (its delta is mostly below one quantization "
            "step). Use lorakit.merge_and_unload(model), which dequantizes to full-precision "
            "layers, keep the adapter unmerged, or (accepting the rounding) "
            "lorakit.merge_and_requantize(model)"
        )

    def merged_linear(self) -> nn.Linear:
        """A full-precision `nn.Linear` computing dequant(W) + sum of the active deltas.

        Summed in float32, stored in the weight's dtype from before quantization (float32
        for 8-bit layers, which do not record it).
        """
        with torch.no_grad():
            weight = dequantized_weight(self)
            for name in self.lora_active:
                weight += self.delta_weight(name).to(weight)
        return full_precision_linear(self, weight, self._merged_bias())

    def requantize_merged(self) -> float:
        """Write dequant(W) + sum of the active deltas back into this layer's codes, in place
        (same quantization settings), and drop every adapter: the layer is its base class again.

        Returns the rounding error: ||Q(W + D) - (W + D)|| / ||D|| (Frobenius norms), the share
        of the adapters' delta D the codes could not keep: 0 for no delta, about 0.15-0.25
        (NF4 / FP4) when D is as large as W's own entries, and 1 or more (the block scales
        move too) when D is below one quantization step, as after most finetuning.
        Adapters with `lora_bias` add s * b to the layer's bias (refused where it has none).
        """
        merged_bias = self._merged_bias()
        if merged_bias is not None and self.bias is None:
            raise MergeError(
                f"cannot requantize adapters with lora_bias into {type(self).__name__}: the "
                "layer has no bias to take s * b; use lorakit.merge_and_unload(model)"
            )
        with torch.no_grad():
            weight = dequantized_weight(self)
            delta = torch.zeros_like(weight)
            for name in self.lora_active:
                delta += self.delta_weight(name).to(weight)
            requantize_(self, weight + delta)
            if merged_bias is not None:
                self.bias.copy_(merged_bias)
            lost = (dequantized_weight(self) - weight - delta).norm()
            size = delta.norm()
        self.restore()
        return float(lost / size) if size > 0 else 0.0

    def _merged_bias(self) -> torch.Tensor | None:
        """The bias plus s * b of each active adapter with lora_bias (float32), or None when
        there is neither: a new Linear can take the lora biases even where the base had none."""
        biased = [self.lora[n] for n in self.lora_active if self.lora[n].lora_bias is not None]
        if self.bias is None and not biased:
            return None
        total = torch.zeros(self.out_features, device=self.weight.device)
        total = total if self.bias is None else total + self.bias.float()
        for adapter in biased:
            total = total + adapter.lora_bias.float() * adapter.scaling
        return total


class Linear4bitLoraMixin(QuantizedLinearLoraMixin):
    bits = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused path where it applies (`lorakit.fused_quantized`), else the plain one."""
        from ..fused_quantized import fusable_adapters, fused_4bit_linear

        adapters = fusable_adapters(self, x)
        if not adapters:
            return LoraLayer.forward(self, x)
        return fused_4bit_linear(x, self.weight, self.bias, adapters)

    @classmethod
    def adapt(cls, module: nn.Module) -> LoraLayer:
        """As `LoraLayer.adapt`, and without bitsandbytes' CPU inference repacking, whose
        kernel has no backward (see `dequantize.keep_trainable_layout`)."""
        keep_trainable_layout(module)
        return super().adapt(module)


class Linear8bitLoraMixin(QuantizedLinearLoraMixin):
    bits = 8


class LoRALinear4bit(Linear4bitLoraMixin, bnb.nn.Linear4bit):
    """A bitsandbytes `Linear4bit` with LoRA adapters."""

    base_class = bnb.nn.Linear4bit


class LoRALinear8bitLt(Linear8bitLoraMixin, bnb.nn.Linear8bitLt):
    """A bitsandbytes `Linear8bitLt` with LoRA adapters."""

    base_class = bnb.nn.Linear8bitLt


QUANTIZED_CLASSES: dict[type[nn.Module], type[LoraLayer]] = {
    bnb.nn.Linear4bit: LoRALinear4bit,
    bnb.nn.Linear8bitLt: LoRALinear8bitLt,
}
QUANTIZED_MIXINS: list[tuple[type[nn.Module], type[LoraLayer]]] = [
    (bnb.nn.Linear4bit, Linear4bitLoraMixin),
    (bnb.nn.Linear8bitLt, Linear8bitLoraMixin),
]
