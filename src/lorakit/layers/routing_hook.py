"""`RoutingHook`: what a layer's `lora_routing` is, so layers need not import `lorakit.routing`.

`lorakit.routing.RowRouting` is the one implementation (mixed-adapter batches); the protocol
lives here, beside the layers that call it, because `routing` imports the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import Tensor

if TYPE_CHECKING:  # base.py imports this module: the name is for annotations only
    from .base import LoraLayer


class RoutingHook(Protocol):
    """Per-row adapter routing: a layer with one set adds these deltas instead of its own."""

    def add_delta(self, layer: LoraLayer, x: Tensor, y: Tensor) -> Tensor:
        """y (the base output of `layer` for input x) plus each row's adapter delta."""
        ...
