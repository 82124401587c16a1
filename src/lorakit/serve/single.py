"""A prefill's adapter: the model's own layers with one adapter active, not a routing context.

A request joining the batch is prefilled alone, so its one adapter can simply be the active
one; the adapted layers then take their fused path, exactly as `lorakit.llm.generate` does
with `using_adapter`. Entering a `routing` context instead re-checks the stacked factors of
every adapter on every layer, and `lorakit.set_active` re-freezes every parameter: with 16
adapters on SmolLM2 either costs a large part of a short prompt's forward on a CPU. This
only swaps each layer's active list (requires_grad is left alone: inference only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..merge import disabled
from ..tree import lora_layers


@contextmanager
def single_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Within the block the model adds adapter `name` alone (None: no adapter, the base)."""
    if name is None:
        with disabled(model):
            yield model
        return
    layers = [layer for _, layer in lora_layers(model)]
    saved = [layer.lora_active for layer in layers]
    try:
        for layer in layers:
            layer.lora_active = (name,) if name in layer.lora else ()
        yield model
    finally:
        for layer, active in zip(layers, saved):
            layer.lora_active = active
