"""Which modules a config adapts or saves in full, and what the error says when none match."""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .errors import ConfigError, TargetNotFoundError, UnsupportedLayerError
from .layers import LINEAR_TYPES, lora_class
from .layers.parameter import ParamAdapters, ParamHolderMixin, ParamLoraLayer
from .names import name_matches
from .param_targets import find_param_targets
from .tree import base_modules, output_head_names, parent_module

_HINT_NAMES = 24  # how many adaptable layer names an error message lists


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs that `config` adapts, in model order.

    Raises:
        TargetNotFoundError: nothing matched, or a `modules_to_save` name matches no module;
            the message lists the names of the layers lorakit can adapt.
        UnsupportedLayerError: a matched module is of a type LoRA cannot adapt.

    `config.target_parameters` adds `(path, ParamLoraLayer)` pairs (`find_param_targets`).
    """
    saved = saved_paths(model, config.modules_to_save, strict=True)
    heads = output_head_names(model)
    found = []
    for name, module in base_modules(model):
        if not name or name_matches(name, config.exclude):
            continue
        if isinstance(module, (ParamAdapters, ParamLoraLayer)):
            continue  # adapters of raw parameters: not layers of the model
        if any(name == s or name.startswith(s + ".") for s in saved):
            continue
        if config.targets == ALL_LINEAR:
            if not isinstance(module, LINEAR_TYPES) or name in heads:
                continue
            if isinstance(parent_module(model, name), nn.MultiheadAttention):
                continue  # MHA reads out_proj.weight directly, never calls its forward
        elif not name_matches(name, config.targets):
            continue
        if isinstance(parent_module(model, name), nn.MultiheadAttention):
            if any(path == name for path, _ in found):
                continue  # the out_proj of a matched MHA: adapted with it, just below
            raise UnsupportedLayerError(
                f"cannot adapt {name!r}: nn.MultiheadAttention uses its weights without calling "
                "the layer, so LoRA there would be silently ignored; target the attention "
                f"module {name.rpartition('.')[0]!r} itself to adapt its in- and out-projection "
                "(as PEFT does)"
            )
        if isinstance(module, ParamHolderMixin):
            raise UnsupportedLayerError(
                f"cannot adapt {name!r} as a layer: its parameters are adapted "
                "(target_parameters); target the module or its parameters, not both"
            )
        lora_class(module)  # raises for a type LoRA cannot adapt, before anything changes
        found.append((name, module))
        if isinstance(module, nn.MultiheadAttention):
            found.append(_attention_out_proj(name, module, config))
    found += find_param_targets(model, config, found)
    if not found:
        raise TargetNotFoundError(
            f"targets={config.targets!r} matched no module of {type(model).__name__}; "
            + _adaptable_hint(model, suggest_all_linear=config.targets != ALL_LINEAR)
        )
    return found


def _attention_out_proj(
    name: str, module: nn.MultiheadAttention, config: LoraConfig
) -> tuple[str, nn.Module]:
    """The out_proj that an adapted MHA `name` adapts beside its in-projection (see
    `layers.mha`); biases are refused there: PEFT keeps them under its wrappers' names."""
    if config.bias != "none":
        raise ConfigError(
            f"bias={config.bias!r} is not supported with nn.MultiheadAttention {name!r}: "
            "lorakit does not save its biases in PEFT's layout; use bias='none'"
        )
    if config.lora_bias or config.init not in ("kaiming", "gaussian", "zeros"):
        option = "lora_bias=True" if config.lora_bias else f"init={config.init!r}"
        why = "PEFT ignores a lora_bias there" if config.lora_bias else "no weight to read"
        raise UnsupportedLayerError(
            f"{option} is not supported on nn.MultiheadAttention {name!r}: its deltas are "
            f"merged into the packed weights for each forward ({why})"
        )
    out_proj = module.out_proj
    lora_class(out_proj)
    return f"{name}.out_proj", out_proj


def saved_paths(model: nn.Module, names: tuple[str, ...], strict: bool = False) -> list[str]:
    """Module paths that `modules_to_save` names (names or suffixes) select, in model order.

    Raises:
        TargetNotFoundError: with `strict`, a name matches no module (its head would train
            nowhere and be saved nowhere).
    """
    paths = [n for n, _ in base_modules(model) if n]
    if strict:
        missing = [s for s in names if not any(name_matches(p, (s,)) for p in paths)]
        if missing:
            raise TargetNotFoundError(
                f"modules_to_save={list(names)!r}: {missing} matched no module of "
                f"{type(model).__name__}, whose top-level modules are "
                f"{[n for n, _ in model.named_children()]}"
            )
    return [p for p in paths if name_matches(p, names)]


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
    if isinstance(module, (ParamAdapters, ParamLoraLayer)):
        return False
    if isinstance(parent_module(model, name), nn.MultiheadAttention):
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
