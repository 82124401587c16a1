"""LoRA for `nn.Linear`: y = x W^T + b + s * B(A(drop(x)))."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..fused import autocast_dtype, fused_lora_linear
from .base import LoraLayer
from .dora import DoRA, dora_rescaled
from .lora import LoRA


class LinearLoraMixin(LoraLayer):
    """Mixin: the per-type math of any layer with a Linear-shaped weight (out, in).

    `forward` takes the fused fast path (`fused.fused_lora_linear`: one autograd node,
    the low-rank product added into the base output in place, no gradient for W, dropout
    masks kept as booleans rather than a dropped copy of x) whenever it computes what the plain path
    `LoraLayer.forward` would (equal to rounding in float32), and falls back to the plain path
    otherwise: routing, disabled, everything merged, a base subclass with its own forward, an
    adapter subclass, dropout under torch.compile. One difference by design: with adapters in
    a wider dtype than the base (float32 adapters on a bf16 model) the fused path computes the
    low-rank term in the base's dtype, as autocast would, where the plain path upcasts x;
    the adapters' gradients still arrive in their own dtype. A DoRA adapter rides the fused
    path as the last active adapter, without dropout in training and with nothing merged: the
    fused op without bias, then f * y + b (`layers.dora.dora_rescaled`). Adapters with
    `lora_bias` add s * b to the one bias the fused op takes (with DoRA: the plain path).
    """

    # The base class whose forward the fused op reproduces, and the layout of `weight`.
    fused_base: ClassVar[type[nn.Module]] = nn.Linear
    weight_transposed: ClassVar[bool] = False
    supports_dora = True

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        out_features, in_features = self.weight.shape
        return in_features, out_features, ()

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        return adapter(x)

    def forward(self, x: Tensor) -> Tensor:
        """base(x) + sum_a s_a * B_a(A_a(drop_a(x))), fused when possible."""
        adapters = self._fused_adapters(x)
        if not adapters:
            return super().forward(x)
        dora = adapters[-1] if type(adapters[-1]) is DoRA else None
        y = fused_lora_linear(
            x,
            self.weight,
            None if dora else _with_lora_biases(self.bias, adapters),
            tuple(a.lora_A for a in adapters),
            tuple(a.lora_B for a in adapters),
            tuple(a.scaling for a in adapters),
            dropout=tuple(_dropout_p(a) for a in adapters),  # masks: global RNG, as nn.Dropout
            transposed=self.weight_transposed,
        )
        return y if dora is None else dora_rescaled(self, dora, y)

    def _fused_adapters(self, x: Tensor) -> list[LoRA]:
        """Adapters the fused path adds, or [] when the plain path must run instead."""
        if self.lora_disabled or self.lora_routing is not None:
            return []
        if self.base_class.forward is not self.fused_base.forward:
            return []  # a subclass with its own forward: only the plain path calls it
        if not x.is_floating_point():
            return []
        if x.dtype != self.weight.dtype and autocast_dtype(x.device.type) is None:
            return []
        merged, modules = self.lora_merged, self.lora._modules
        adapters = [modules[n] for n in self.lora_active if n not in merged]
        for i, adapter in enumerate(adapters):
            # a LoRA subclass or an unusual dropout: the plain path computes it
            if type(adapter) not in (LoRA, DoRA):
                return []
            if type(adapter.dropout) not in (nn.Dropout, nn.Identity):
                return []
            # DoRA rescales all before it: fused as the last adapter, without dropout in
            # training (PEFT's other form) and with W unmerged (its norm is of the base W)
            if type(adapter) is DoRA and (i < len(adapters) - 1 or _dropout_p(adapter) or merged):
                return []
            if type(adapter) is DoRA and any(a.lora_bias is not None for a in adapters):
                return []  # the lora biases belong before DoRA's rescaling: the plain path
            if _dropout_p(adapter) > 0 and torch.compiler.is_compiling():
                return []  # nn.Dropout compiles as is; the 16-bit CPU masks are eager-only
        return adapters


def _with_lora_biases(bias: Tensor | None, adapters: list[LoRA]) -> Tensor | None:
    """The base bias plus s * b of each adapter with lora_bias: the fused op adds one bias
    (its gradient flows back to each b through the sum)."""
    for adapter in adapters:
        if adapter.lora_bias is not None:
            term = adapter.lora_bias * adapter.scaling
            bias = term if bias is None else bias + term
    return bias


def _dropout_p(adapter: LoRA) -> float:
    """The dropout the fused op applies: none in eval mode."""
    return adapter.dropout_p if adapter.dropout.training else 0.0


class LoRALinear(LinearLoraMixin, nn.Linear):
    """An `nn.Linear` with LoRA adapters; `weight` and `bias` keep their names."""

    base_class = nn.Linear


# Deprecated alias: the mixin's old name, kept so pickles and code that name it still load.
LinearLora = LinearLoraMixin
