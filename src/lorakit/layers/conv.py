"""LoRA for `nn.Conv1d/2d/3d`: y = conv(x, W) + s * conv1x1(conv(drop(x), A), B).

A (r, in, *kernel) is a conv with the base's stride, padding and dilation; B (out, r, 1...)
is a pointwise conv, so the merged weight is W + s * B A with the base's shape.

A conv with groups > 1 gets PEFT's adapter: A an ungrouped conv (r, in, *kernel), B a pointwise
conv with the base's groups, (out, r / groups, 1...). Its update B A is then an ungrouped
(out, in, *kernel) kernel that no grouped weight (out, in / groups, *kernel) can hold, so such
an adapter is never merged (PEFT refuses the same): `merge` raises MergeError.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer
from .lora import LoRA

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POINTWISE = _CONV  # the old name


class ConvLoraMixin(LoraLayer):
    """Mixin: the per-type math of a convolution (any groups; see the module docstring)."""

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        return self.in_channels, self.out_channels, tuple(self.kernel_size)

    def lora_groups(self) -> int:
        return self.groups

    supports_dora = True

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        return self.lora_product(adapter, adapter.dropout(x.to(adapter.lora_A.dtype)))

    def lora_product(self, adapter: LoRA, x: Tensor) -> Tensor:
        """s * (B(A(x)) + b) without dropout: A a conv with the base's stride, padding and
        dilation (but groups 1), B pointwise with the base's groups."""
        conv = _CONV[len(self.kernel_size)]
        x, padding = self._padded(x)
        h = conv(x, adapter.lora_A, None, self.stride, padding, self.dilation)
        return conv(h, adapter.lora_B, adapter.lora_bias, groups=self.groups) * adapter.scaling

    def _padded(self, x: Tensor) -> tuple[Tensor, object]:
        """(input, padding) for a conv as the base pads: `_conv_forward`'s rule, which pads
        explicitly for padding modes other than zeros."""
        if self.padding_mode == "zeros":
            return x, self.padding
        pad = self._reversed_padding_repeated_twice
        return F.pad(x, pad, mode=self.padding_mode), 0

    def merge_refusal(self, adapter_name: str) -> str | None:
        """Why adapter `adapter_name` cannot be merged into this layer (None: it can)."""
        if self.groups == 1:
            return super().merge_refusal(adapter_name)
        return (
            f"cannot merge adapter {adapter_name!r} into {type(self).__name__} with "
            f"groups={self.groups}: its update B A is an ungrouped kernel that the grouped "
            "weight cannot hold (PEFT refuses this merge too); keep the adapter unmerged"
        )


class LoRAConv1d(ConvLoraMixin, nn.Conv1d):
    """torch's `nn.Conv1d` with LoRA adapters (GPT-2's `Conv1D` is `LoRAGPT2Conv1D`)."""

    base_class = nn.Conv1d


class LoRAConv2d(ConvLoraMixin, nn.Conv2d):
    base_class = nn.Conv2d


class LoRAConv3d(ConvLoraMixin, nn.Conv3d):
    base_class = nn.Conv3d


# Deprecated alias: the mixin's old name, kept so pickles and code that name it still load.
ConvLora = ConvLoraMixin
