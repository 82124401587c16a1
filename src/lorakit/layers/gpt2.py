"""LoRA for GPT-2's `Conv1D` (transformers): a Linear whose weight is stored as (in, out)."""

from __future__ import annotations

from torch import Tensor
from transformers.pytorch_utils import Conv1D

from .linear import LinearLoraMixin


class GPT2Conv1DLoraMixin(LinearLoraMixin):
    """Mixin: the per-type math of a transposed weight (in, out), PEFT's fan_in_fan_out.

    The fused fast path is the Linear one with W read transposed (a view, no copy).
    """

    fused_base = Conv1D
    weight_transposed = True

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        in_features, out_features = self.weight.shape
        return in_features, out_features, ()

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t()


class LoRAGPT2Conv1D(GPT2Conv1DLoraMixin, Conv1D):
    """GPT-2's `Conv1D` with LoRA adapters; A is (r, in) and B (out, r) as for a Linear."""

    base_class = Conv1D


# Deprecated aliases: the old names, kept so pickles and code that name them still load.
Conv1DLora = GPT2Conv1DLoraMixin
LoRAConv1D = LoRAGPT2Conv1D
