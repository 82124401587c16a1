"""Which adapters a model holds, read from its LoRA layers, so any wrapper answers the same.

`inject` marks each adapter module it adds with the config it came from and its place in the
order of injection. Nothing is kept on the model itself: the model, a wrapper around it
(`nn.Sequential(model)`), a copy or a pickle all list the adapters their layers hold.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .config import LoraConfig
from .errors import AdapterError
from .tree import lora_layers

_MARK = "lorakit_registered"  # attribute of each adapter module `inject` adds


class Registered(NamedTuple):
    """What an adapter module records: its place in the injection order, its whole config."""

    order: int
    config: LoraConfig


def check_adapter_name(name: object) -> str:
    """Adapter names are plain identifiers: no paths, dots or empty strings."""
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"adapter_name must be a plain identifier, got {name!r}")
    return name


def register(adapter: nn.Module, order: int, config: LoraConfig) -> None:
    """Mark `adapter` as injected `order`-th with `config` (the whole, not per-module, one)."""
    setattr(adapter, _MARK, Registered(order, config))


def _registered(model: nn.Module) -> dict[str, Registered]:
    """{adapter name: its record}, from the first layer (in model order) that holds it."""
    found: dict[str, Registered] = {}
    for _, layer in lora_layers(model):
        for name, adapter in layer.lora.items():
            record = getattr(adapter, _MARK, None)
            if record is not None:
                found.setdefault(name, record)
    return found


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of the adapters injected into `model`, oldest first."""
    ordered = sorted(_registered(model).items(), key=lambda item: item[1].order)
    return {name: record.config for name, record in ordered}


def next_order(model: nn.Module) -> int:
    """The injection order the next adapter of `model` gets: after every one it holds."""
    return 1 + max((r.order for r in _registered(model).values()), default=-1)


def adapter_order(model: nn.Module, name: str) -> int:
    """The injection order of adapter `name`, so a rebuilt adapter keeps its place."""
    return _registered(model)[name].order
