"""LoRA for `nn.Linear`: y = x W^T + b + s * B(A(drop(x)))."""

from __future__ import annotations

from torch import Tensor, nn

from .base import LoraLayer
from .lora import LoRA


class LinearLora(LoraLayer):
    """Per-type math for any layer with a Linear-shaped weight (out, in)."""

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        out_features, in_features = self.weight.shape
        return in_features, out_features, ()

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        return adapter(x)


class LoRALinear(LinearLora, nn.Linear):
    """An `nn.Linear` with LoRA adapters; `weight` and `bias` keep their names."""

    base_class = nn.Linear
