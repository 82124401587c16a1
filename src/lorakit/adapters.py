"""Many adapters over one base: list, activate, delete."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .adapter_registry import adapter_configs
from .errors import AdapterError
from .inject import freeze_base
from .tree import lora_layers


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters on `model`, in the order they were added."""
    return tuple(adapter_configs(model))


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters whose deltas the model adds now (on any layer), oldest first."""
    # Adapters may sit on different layers, so no single layer knows them all.
    active: dict[str, None] = {}
    for _, layer in lora_layers(model):
        active.update(dict.fromkeys(layer.lora_active))
    order = {name: i for i, name in enumerate(adapter_names(model))}
    return tuple(sorted(active, key=lambda name: order.get(name, len(order))))


def _check_known(model: nn.Module, names: Iterable[str]) -> tuple[str, ...]:
    known = adapter_names(model)
    names = tuple(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; the model has {list(known)}")
    return names


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Make `names` (one name or several; several add up) the active, trainable adapters.

    Inactive adapters stay on the model with requires_grad False; the base stays frozen.

    Raises:
        AdapterError: a name is unknown, or adapters are merged (unmerge first).
    """
    names = _check_known(model, (names,) if isinstance(names, str) else names)
    for layer_name, layer in lora_layers(model):
        if layer.lora_merged:
            raise AdapterError(
                f"cannot change active adapters while {list(layer.lora_merged)} are merged "
                f"(layer {layer_name!r}); call lorakit.unmerge(model) first"
            )
    for _, layer in lora_layers(model):
        layer.lora_active = tuple(n for n in names if n in layer.lora)
    freeze_base(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (unmerging it first); layers left bare revert."""
    _check_known(model, (name,))
    for _, layer in list(lora_layers(model)):
        if name in layer.lora:
            layer.delete_adapter(name)
        if len(layer.lora) == 0:
            layer.restore()
