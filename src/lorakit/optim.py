"""Optimizer parameter groups for LoRA, with LoRA+ (B learns faster than A).

LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) gives each `lora_B` a learning
rate `loraplus_ratio` times A's, which trains faster at the same cost. The groups follow
PEFT's `create_loraplus_optimizer` rule by rule, so the same model gets the same learning rate
and weight decay per parameter:

- adapters of an embedding layer: `embedding_lr` (PEFT's default is 1e-6; here it is `lr`
  unless given);
- every `lora_B` and every other 1-D trainable tensor: `lr * loraplus_ratio`, without weight
  decay for biases and LayerNorm parameters;
- everything else that trains (`lora_A`, fully trained heads): `lr`.

    optimizer = torch.optim.AdamW(lorakit.optim.param_groups(model, lr=2e-4, loraplus_ratio=16))
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import ConfigError
from .layers.base import LoraLayer

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


def param_groups(
    model: nn.Module,
    lr: float,
    loraplus_ratio: float = 1.0,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
) -> list[dict[str, Any]]:
    """The trainable parameters of `model` as optimizer groups (empty groups left out).

    Raises:
        ConfigError: a learning rate, ratio or weight decay that is negative or not finite,
            or a model with nothing to train.
    """
    given = {"lr": lr, "loraplus_ratio": loraplus_ratio, "weight_decay": weight_decay,
             "embedding_lr": embedding_lr}  # fmt: skip
    for name, value in given.items():
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < 0
            or (not math.isfinite(value))
        ):
            raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    embedding, no_decay = _embedding_adapter_params(model), _no_decay_params(model)
    groups: dict[str, dict[str, Any]] = {
        "A": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "embedding": {
            "params": [],
            "lr": lr if embedding_lr is None else embedding_lr,
            "weight_decay": weight_decay,
        },  # fmt: skip
        "B": {"params": [], "lr": lr * loraplus_ratio, "weight_decay": weight_decay},
        "B_no_decay": {"params": [], "lr": lr * loraplus_ratio, "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embedding:
            group = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            group = "B_no_decay" if id(param) in no_decay else "B"
        else:
            group = "A"
        groups[group]["params"].append(param)
    chosen = [g for g in groups.values() if g["params"]]
    if not chosen:
        raise ConfigError("the model has no trainable parameters (inject an adapter first)")
    return chosen


def _embedding_adapter_params(model: nn.Module) -> set[int]:
    """ids of the adapter parameters of adapted embedding layers."""
    return {
        id(p)
        for layer in model.modules()
        if isinstance(layer, LoraLayer) and isinstance(layer, nn.Embedding)
        for p in layer.lora.parameters()
    }


def _no_decay_params(model: nn.Module) -> set[int]:
    """ids of the parameters PEFT exempts from weight decay: biases and LayerNorm's."""
    exempt = {id(p) for name, p in model.named_parameters() if "bias" in name}
    for module in model.modules():
        if isinstance(module, _NORMS):
            exempt.update(id(p) for p in module.parameters())
    return exempt
