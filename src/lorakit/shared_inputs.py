"""Shared-input fusion: adapted layers that read one input take their LoRA products together.

q, k and v of an attention block read the same hidden states, gate and up of a gated MLP the
same normed input. Instead of each taking its own thin product x A_i^T, the first of them to
run takes x [A_q; A_k; A_v]^T as one GEMM and leaves the others their columns; the backward
takes the three grad A's from one GEMM as well (`lorakit.shared_product`).

Which layers form a `SharedInputGroup` (a plain attribute of each, `lora_fusion`; nothing is
kept on the model) is decided when they are adapted: see `lorakit.shared_input_links`. The
group never trusts that its members read one tensor; it checks on every call:

- The first member to run (the leader) takes the product for every member that can share
  now, and keeps each one's part keyed by the very input tensor it got (the object, its
  version counter, grad mode). A member takes its part only if it gets that same tensor,
  unchanged; so values and gradients are those of the per-layer path, to rounding.
- A member that gets another tensor while its part waits (k and v of a cross-attention, which
  read the encoder's states) leads a new product for itself and the members still waiting,
  which take theirs from it if they read what it read.
- A member shares only with one active, unmerged plain-LoRA adapter, no dropout in effect
  (each layer draws its own mask), the base weight in x's dtype and no autocast, outside
  torch.compile and inference mode, on the fast path (no routing, not disabled); else it
  runs the per-layer path for that call, and the others share without it.

Nothing is learned from a call: which path a layer takes (leader, taker of a part, or its own)
depends only on the layers' state and on which tensor each member gets. So a forward repeated
on the same input gives the same bits, and a recomputation under non-reentrant gradient
checkpointing takes the same paths and saves the same tensors as the forward it replays. The
leader's parts hold the input only weakly: a part nobody takes is dropped with its input, or
at the next leader's call. Threads running one model at once stay exact (every part is
checked against the tensor at hand), they only share less.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .fused import _needs_graph, autocast_dtype, merge_pays
from .layers.linear import LinearLoraMixin, _dropout_p
from .layers.lora import LoRA
from .shared_product import given_product_linear, stacked_products

ATTR = "lora_fusion"  # a layer's group; None: not linked; False: turned off by the user


class _Part(NamedTuple):
    """A member's share of the leader's product, and what it was taken with."""

    h: Tensor
    factor: Tensor  # A in x's dtype, as multiplied
    param: Tensor  # the adapter's lora_A, and its version then
    version: int


class _Entry:
    """The leader's product: the parts the other members may take, keyed by the input."""

    def __init__(self, x: Tensor, parts: dict[nn.Module, _Part]) -> None:
        self.x_ref = weakref.ref(x)  # weak: a part nobody takes must not keep x alive
        self.version = x._version
        self.grad = torch.is_grad_enabled()
        self.parts = parts

    def alive(self) -> bool:
        return self.x_ref() is not None

    def same_input(self, x: Tensor) -> bool:
        """Whether x is the tensor the product was taken of, unchanged, in the same mode."""
        same = self.x_ref() is x and x._version == self.version
        return same and torch.is_grad_enabled() == self.grad


class SharedInputGroup:
    """Layers that may read one input; see the module docstring.

    members: the layers of the group. named: the user named it (`fuse_shared_inputs`).
    """

    def __init__(self, members: Sequence[nn.Module], named: bool = False) -> None:
        self.members = list(members)
        self.named = named
        self._entry: _Entry | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_entry": None}  # a pending product is no state to copy

    def forward(self, layer: LinearLoraMixin, x: Tensor, adapter: LoRA) -> Tensor | None:
        """`layer`'s output for x through the shared product, or None: use its own path."""
        if not any(m is layer for m in self.members) or not _call_can_share(x):
            return None
        if not _adapter_can_share(layer, adapter, x):
            return None
        entry = self._entry
        part = entry.parts.pop(layer, None) if entry is not None and entry.alive() else None
        if part is None:
            return self._lead(layer, x, adapter, self.members)
        if not entry.parts and self._entry is entry:  # (another thread may have led since)
            self._entry = None
        unchanged = adapter.lora_A is part.param and part.param._version == part.version
        if entry.same_input(x) and unchanged:
            return _output(layer, x, adapter, part.h, part.factor)
        # another input than the leader's: lead a product for the members still waiting
        return self._lead(layer, x, adapter, list(entry.parts))

    def _lead(
        self, layer: LinearLoraMixin, x: Tensor, adapter: LoRA, candidates: list[nn.Module]
    ) -> Tensor:
        """Take the product for `layer` and the `candidates` that can share now; keep theirs."""
        sharers = [(layer, adapter)]
        for m in candidates:
            found = None if m is layer else self._sibling_adapter(m, x)
            if found is not None:
                sharers.append((m, found))
        factors = [_in_dtype(a.lora_A, x.dtype) for _, a in sharers]
        hs = stacked_products(x.reshape(-1, x.shape[-1]), factors)
        parts = {
            m: _Part(h, f, a.lora_A, a.lora_A._version)
            for (m, a), h, f in zip(sharers[1:], hs[1:], factors[1:])
        }
        self._entry = _Entry(x, parts) if parts else None
        return _output(layer, x, adapter, hs[0], factors[0])

    def _sibling_adapter(self, member: nn.Module, x: Tensor) -> LoRA | None:
        """The adapter `member` would share for input x, or None."""
        if member.__dict__.get(ATTR) is not self:  # restored, or linked elsewhere since
            return None
        adapters = member._fused_adapters(x)
        if len(adapters) != 1 or not _adapter_can_share(member, adapters[0], x):
            return None
        return adapters[0]


def _call_can_share(x: Tensor) -> bool:
    """Conditions on the call: eager, no autocast, a float tensor with a version counter."""
    if torch.compiler.is_compiling() or not x.is_floating_point() or x.is_inference():
        return False
    return autocast_dtype(x.device.type) is None


def _adapter_can_share(layer: LinearLoraMixin, adapter: LoRA, x: Tensor) -> bool:
    """A plain LoRA without dropout in effect or `lora_bias`, the base in x's dtype, A on x's
    device, and x A^T needed: in inference a layer that folds its adapter into W' never takes
    it."""
    if type(adapter) is not LoRA or _dropout_p(adapter) != 0.0 or adapter.lora_bias is not None:
        return False
    weight = layer.weight
    if weight.dtype != x.dtype or adapter.lora_A.device != x.device:
        return False
    tensors = (x, weight, layer.bias, adapter.lora_A, adapter.lora_B)
    return _needs_graph(*tensors) or not merge_pays(x.numel() // x.shape[-1], weight, (0.0,))


def _in_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _output(layer: LinearLoraMixin, x: Tensor, adapter: LoRA, h: Tensor, A: Tensor) -> Tensor:
    """The layer's y = x W^T + b + s h B^T, h its part of the shared product."""
    dtype = x.dtype
    return given_product_linear(
        x, layer.weight, _in_dtype(layer.bias, dtype), h, A, _in_dtype(adapter.lora_B, dtype),
        adapter.scaling, layer.weight_transposed,
    )  # fmt: skip
