"""LoRA for `nn.Conv1d/2d/3d`: y = conv(x, W) + s * conv1x1(conv(drop(x), A), B).

A (r, in, *kernel) is a conv with the base's stride, padding and dilation; B (out, r, 1...)
is a pointwise conv, so the merged weight is W + s * B A with the base's shape.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer
from .lora import LoRA

_POINTWISE = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvLoraMixin(LoraLayer):
    """Mixin: the per-type math of a convolution with groups == 1."""

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_channels, self.out_channels, tuple(self.kernel_size)

    supports_dora = True

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        return self.lora_product(adapter, adapter.dropout(x.to(adapter.lora_A.dtype)))

    def lora_product(self, adapter: LoRA, x: Tensor) -> Tensor:
        """s * B(A(x)) without dropout: A a conv with the base's stride, padding, dilation."""
        h = self._conv_forward(x, adapter.lora_A, None)
        return _POINTWISE[len(self.kernel_size)](h, adapter.lora_B) * adapter.scaling


class LoRAConv1d(ConvLoraMixin, nn.Conv1d):
    """torch's `nn.Conv1d` with LoRA adapters (GPT-2's `Conv1D` is `LoRAGPT2Conv1D`)."""

    base_class = nn.Conv1d


class LoRAConv2d(ConvLoraMixin, nn.Conv2d):
    base_class = nn.Conv2d


class LoRAConv3d(ConvLoraMixin, nn.Conv3d):
    base_class = nn.Conv3d


# Deprecated alias: the mixin's old name, kept so pickles and code that name it still load.
ConvLora = ConvLoraMixin
