"""Injection: find the target layers of a model, adapt them in place, freeze the rest."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import AdapterError, LorakitError, TargetNotFoundError, UnsupportedLayerError
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
        TargetNotFoundError: nothing matched, or a `modules_to_save` name matches no module;
            the message lists the names of the layers lorakit can adapt.
        UnsupportedLayerError: a matched module is of a type LoRA cannot adapt.
    """
    saved = saved_paths(model, config.modules_to_save, strict=True)
    heads = output_head_names(model)
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
        raise TargetNotFoundError(
            f"targets={config.targets!r} matched no module of {type(model).__name__}; "
            + _adaptable_hint(model, suggest_all_linear=config.targets != ALL_LINEAR)
        )
    return found


def saved_paths(model: nn.Module, names: tuple[str, ...], strict: bool = False) -> list[str]:
    """Module paths that `modules_to_save` names (names or suffixes) select, in model order.

    Raises:
        TargetNotFoundError: with `strict`, a name matches no module (its head would train
            nowhere and be saved nowhere).
    """
    paths = [n for n, _ in base_modules(model) if n]
    if strict:
        missing = [s for s in names if not any(matches_suffix(p, (s,)) for p in paths)]
        if missing:
            raise TargetNotFoundError(
                f"modules_to_save={list(names)!r}: {missing} matched no module of "
                f"{type(model).__name__}, whose top-level modules are "
                f"{[n for n, _ in model.named_children()]}"
            )
    return [p for p in paths if matches_suffix(p, names)]


def without_missing_saved(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` keeping only the `modules_to_save` names that match a module of `model`.

    For adapter files: PEFT writes ["classifier", "score"] into every sequence-classification
    config and ignores the name a model lacks, so a loader does the same.
    """
    names = tuple(s for s in config.modules_to_save if saved_paths(model, (s,)))
    if names == config.modules_to_save:
        return config
    return dataclasses.replace(config, modules_to_save=names)


def adaptable_names(model: nn.Module) -> list[str]:
    """Distinct last path components of the layers lorakit can adapt, in model order."""
    names: dict[str, None] = {}
    for name, module in base_modules(model):
        if name and _adaptable(model, name, module):
            names[name.rpartition(".")[2]] = None
    return list(names)


def _adaptable(model: nn.Module, name: str, module: nn.Module) -> bool:
    if isinstance(_parent(model, name), nn.MultiheadAttention):
        return False
    try:
        lora_class(module)
    except UnsupportedLayerError:
        return False
    return True


def _adaptable_hint(model: nn.Module, suggest_all_linear: bool) -> str:
    """The part of a TargetNotFoundError that says what could be named instead."""
    names = adaptable_names(model)
    shown = names[:_HINT_NAMES] + (["..."] if len(names) > _HINT_NAMES else [])
    hint = f"the layers lorakit can adapt here are named {shown} (a name matches a path's end)"
    return hint + (f', or use targets="{ALL_LINEAR}"' if suggest_all_linear else "")


_HINT_NAMES = 24  # how many adaptable layer names an error message lists


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

    All or nothing: if any layer's adapter cannot be built, every change is undone (layer
    classes, adapters added, active adapters, requires_grad) before the error is raised.

    Raises:
        AdapterError: `adapter_name` is not an identifier or is already on the model, or an
            adapter cannot be built (e.g. a rank too large for memory); names the module.
        ConfigError: an option does not fit a module (e.g. a scale its dtype cannot hold).
        TargetNotFoundError / UnsupportedLayerError: see `find_targets`.
    """
    config = config or LoraConfig()
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise AdapterError(f"adapter {adapter_name!r} is already on the model; pick another name")
    return inject_found(model, config, find_targets(model, config), adapter_name)


def inject_found(
    model: nn.Module, config: LoraConfig, targets: list[tuple[str, nn.Module]], adapter_name: str
) -> InjectionReport:
    """`inject` into `targets`, what `find_targets(model, config)` returned, for a caller that
    found them already (`load_adapter` checks them before the model changes) and checked
    `adapter_name`."""
    undo = _Undo.take(model, targets)
    try:
        _add_adapters(model, targets, config, adapter_name)
        model.__dict__.setdefault(CONFIGS_ATTR, {})[adapter_name] = config
        for _, layer in lora_layers(model):
            layer.lora_active = (adapter_name,) if adapter_name in layer.lora else ()
        saved = freeze_base(model)
    except BaseException:
        undo.apply(model, adapter_name)
        raise
    trainable, total = trainable_parameters(model)
    return InjectionReport(adapter_name, tuple(n for n, _ in targets), saved, trainable, total)


def _add_adapters(
    model: nn.Module, targets: list[tuple[str, nn.Module]], config: LoraConfig, adapter_name: str
) -> None:
    """Adapt each target and add the adapter; an error names the adapter and the module."""
    for name, module in targets:
        try:
            layer = module if isinstance(module, LoraLayer) else lora_class(module).adapt(module)
            layer.add_adapter(adapter_name, config.for_module(name))
        except LorakitError as err:  # names the adapter and the value already
            raise type(err)(f"module {name!r}: {err}; the model is left as it was") from err
        except Exception as err:
            raise AdapterError(
                f"cannot add adapter {adapter_name!r} to module {name!r}: "
                f"{type(err).__name__}: {err}; the model is left as it was"
            ) from err


@dataclass
class _Undo:
    """What `inject` may change, recorded before it starts, so a failure can put it back."""

    fresh: list[nn.Module]  # targets that were not LoRA layers yet
    targets: list[nn.Module]
    active: list[tuple[LoraLayer, tuple[str, ...]]]
    requires_grad: list[tuple[nn.Parameter, bool]]
    had_configs: bool

    @classmethod
    def take(cls, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> _Undo:
        modules = [m for _, m in targets]
        return cls(
            fresh=[m for m in modules if not isinstance(m, LoraLayer)],
            targets=modules,
            active=[(layer, layer.lora_active) for _, layer in lora_layers(model)],
            requires_grad=[(p, p.requires_grad) for p in model.parameters()],
            had_configs=CONFIGS_ATTR in model.__dict__,
        )

    def apply(self, model: nn.Module, adapter_name: str) -> None:
        """Remove `adapter_name` wherever it went, restore classes, active sets and flags."""
        for module in self.targets:
            if isinstance(module, LoraLayer) and adapter_name in module.lora:
                del module.lora[adapter_name]
        for module in self.fresh:
            if isinstance(module, LoraLayer):
                module.restore()
        for layer, active in self.active:
            layer.lora_active = active
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        adapter_configs(model).pop(adapter_name, None)
        if not self.had_configs:
            model.__dict__.pop(CONFIGS_ATTR, None)


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
    saved = tuple(saved_paths(model, to_save))
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
