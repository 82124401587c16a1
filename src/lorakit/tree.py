"""Walking a model's module tree: base modules, adapted layers, parents, the output head."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layers import LoraLayer


def base_modules(
    model: nn.Module, prefix: str = "", memo: set[int] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules`, without descending into the adapters of LoRA layers.

    Like `named_modules`, a module registered at several paths (T5's shared embedding) is
    yielded once, at its first path, so it is adapted, merged and unloaded once.
    """
    memo = set() if memo is None else memo
    if id(model) in memo:
        return
    memo.add(id(model))
    yield prefix, model
    for name, child in model.named_children():
        if isinstance(model, LoraLayer) and child is model.lora:
            continue
        yield from base_modules(child, f"{prefix}.{name}" if prefix else name, memo)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every adapted layer of `model`, with its module path."""
    for name, module in base_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def parent_module(model: nn.Module, name: str) -> nn.Module:
    """The module that holds the submodule at path `name` (`model` itself for a child)."""
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the model's output head (transformers' `get_output_embeddings`)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}
