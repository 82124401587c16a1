"""Gradient checkpointing: recompute each block's activations in backward, keep less memory.

Non-reentrant checkpointing (`use_reentrant=False`) needs no input that requires grad, so a
frozen embedding under LoRA adapters just works (the reentrant kind fails there with
"element 0 of tensors does not require grad"), and it replays the RNG state, so dropout
(also the fused path's dropout masks) draws the same masks in the recomputation.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant gradient checkpointing of a `transformers` model's blocks.

    Raises:
        ConfigError: the model has no blocks to checkpoint (not a `transformers` model, or
            one whose class does not support it).
    """
    # transformers 5 renamed the switch; 4.x has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient checkpointing needs a transformers model that supports it; "
            f"{type(model).__name__} does not"
        )
    enable({"use_reentrant": False})
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and warns here


def gradient_checkpointing_enabled(model: nn.Module) -> bool:
    """True if `enable_gradient_checkpointing` (or transformers' own switch) is on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
