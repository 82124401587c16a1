"""Injection: find the target layers of a model, adapt them in place, freeze the rest."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterError, TargetNotFoundError, UnsupportedLayerError
from .layers import LINEAR_TYPES, LoraLayer, lora_class

CONFIGS_ATTR = "lorakit_configs"  # {adapter name: LoraConfig}, kept on the root model


@dataclass(frozen=True)
class InjectionReport:
    """What `inject` did: the adapter, the module paths adapted, and parameter counts."""

    adapter_name: str
    adapted: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"adapter {self.adapter_name!r}: {len(self.adapted)} layers adapted || "
            + format_counts(self.trainable, self.total)
        )


def format_counts(trainable: int, total: int) -> str:
    """PEFT's familiar line: trainable params, all params and their ratio."""
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


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


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """{adapter name: LoraConfig} of the adapters injected into `model`."""
    return model.__dict__.get(CONFIGS_ATTR, {})


def check_adapter_name(name: object) -> str:
    """Adapter names are plain identifiers: no paths, dots or empty strings."""
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"adapter_name must be a plain identifier, got {name!r}")
    return name


def matches_suffix(name: str, patterns: tuple[str, ...]) -> bool:
    """True when `name` is one of `patterns` or ends with "." + one of them."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _matches(patterns: str | tuple[str, ...], name: str) -> bool:
    if isinstance(patterns, str):
        return bool(patterns) and re.fullmatch(patterns, name) is not None
    return matches_suffix(name, patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the model's output head (transformers' `get_output_embeddings`)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs that `config` adapts, in model order.

    Raises:
        TargetNotFoundError: nothing matched; the message lists some module names that exist.
        UnsupportedLayerError: a matched module is of a type LoRA cannot adapt.
    """
    heads = output_head_names(model)
    saved = [n for n, _ in base_modules(model) if n and matches_suffix(n, config.modules_to_save)]
    found = []
    for name, module in base_modules(model):
        if not name or _matches(config.exclude, name):
            continue
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if config.targets == ALL_LINEAR:
            if not isinstance(module, LINEAR_TYPES) or name in heads:
                continue
            if isinstance(_parent(model, name), nn.MultiheadAttention):
                continue  # MHA reads out_proj.weight directly, never calls its forward
        elif not _matches(config.targets, name):
            continue
        if isinstance(_parent(model, name), nn.MultiheadAttention):
            raise UnsupportedLayerError(
                f"cannot adapt {name!r}: nn.MultiheadAttention uses its weights without calling "
                "the layer, so LoRA there would be silently ignored"
            )
        lora_class(module)  # raises for a type LoRA cannot adapt, before anything changes
        found.append((name, module))
    if not found:
        some = [n for n, _ in base_modules(model) if n][:8]
        raise TargetNotFoundError(
            f"targets={config.targets!r} matched no module of {type(model).__name__}; "
            f"modules that exist include {some}"
        )
    return found


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def inject(
    model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default"
) -> InjectionReport:
    """Adapt every layer of `model` that `config.targets` matches, in place, and freeze the rest.

    Each matched layer becomes y = base(x) + s * B(A(drop(x))) with a fresh (no-op) adapter
    named `adapter_name`, which becomes the one active adapter (earlier ones stay on the model,
    inactive, until `set_active`). Base parameters stop training; the active adapter (plus
    biases per `config.bias` and `config.modules_to_save`) trains. Works on meta-device models.

    Raises:
        AdapterError: `adapter_name` is not an identifier or is already on the model.
        TargetNotFoundError / UnsupportedLayerError: see `find_targets`.
    """
    config = config or LoraConfig()
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise AdapterError(f"adapter {adapter_name!r} is already on the model; pick another name")
    targets = find_targets(model, config)
    configs = model.__dict__.setdefault(CONFIGS_ATTR, {})  # only once targets are known good
    for name, module in targets:
        layer = lora_class(module).adapt(module) if not isinstance(module, LoraLayer) else module
        layer.add_adapter(adapter_name, config.for_module(name))
    configs[adapter_name] = config
    for _, layer in lora_layers(model):
        layer.lora_active = (adapter_name,) if adapter_name in layer.lora else ()
    saved = freeze_base(model)
    trainable, total = trainable_parameters(model)
    return InjectionReport(adapter_name, tuple(n for n, _ in targets), saved, trainable, total)


def freeze_base(model: nn.Module) -> tuple[str, ...]:
    """Only active adapters, `modules_to_save` and biases per `bias` keep requires_grad.

    `modules_to_save` and `bias` are the union over the model's adapter configs (those
    modules are trained in place, shared by every adapter). Returns the paths saved in full.
    """
    configs = adapter_configs(model).values()
    bias_modes = {c.bias for c in configs}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for name, adapter in layer.lora.items():
            adapter.requires_grad_(name in layer.lora_active)
        bias = getattr(layer, "bias", None)  # an Embedding has none
        if "lora_only" in bias_modes and isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    if "all" in bias_modes:
        for _, module in base_modules(model):
            if isinstance(getattr(module, "bias", None), nn.Parameter):
                module.bias.requires_grad_(True)
    to_save = tuple(name for c in configs for name in c.modules_to_save)
    saved = tuple(n for n, _ in base_modules(model) if n and matches_suffix(n, to_save))
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    return saved


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad), total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's familiar line: trainable params || all params || trainable%."""
    print(format_counts(*trainable_parameters(model)))


def summary(model: nn.Module) -> str:
    """A table of adapted layers: path, adapter, rank, alpha, scale, and the counts line."""
    rows = [("module", "adapter", "rank", "alpha", "scaling", "merged")]
    for name, layer in lora_layers(model):
        for adapter_name, a in layer.lora.items():
            merged = "yes" if adapter_name in layer.lora_merged else "no"
            rows.append((name, adapter_name, str(a.rank), f"{a.alpha:g}", f"{a.scaling:g}", merged))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([*lines, format_counts(*trainable_parameters(model))])
