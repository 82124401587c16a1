"""Injection: adapt the target layers of a model in place, freeze the rest, undo on failure."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapter_registry import adapter_configs, check_adapter_name, next_order, register
from .config import LoraConfig
from .errors import AdapterError, LorakitError
from .layers import LoraLayer, lora_class
from .layers.mha import out_proj_owners
from .layers.parameter import parameter_path
from .layers.weight_init import (
    check_init_on_layer,
    check_untied,
    reads_weight,
    undo_weight_init,
)
from .overview import InjectionReport, trainable_parameters
from .shared_input_links import link_siblings
from .targets import find_targets, saved_paths
from .token_targets import add_token_adapters, find_token_targets
from .tree import base_modules, lora_layers


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
    order = next_order(model)
    if reads_weight(config.init) or config.init in ("orthogonal", "loftq"):
        _check_inits(model, targets, config)  # PiSSA / OLoRA rewrite base weights: check all
    tokens = find_token_targets(model, config, targets)  # trainable_token_indices, checked
    token_modules = [(t.path, t.module) for t in tokens] + [x for t in tokens for x in t.tied]
    undo = _Undo.take(model, targets + token_modules)
    try:
        _add_adapters(targets, config, adapter_name, order)
        for rows in add_token_adapters(tokens, adapter_name, config):
            register(rows, order, config)
        for _, layer in lora_layers(model):
            layer.lora_active = (adapter_name,) if adapter_name in layer.lora else ()
        saved = freeze_base(model)
        link_siblings(model)  # layers reading one input share their products
    except BaseException:
        undo.apply(adapter_name)
        raise
    trainable, total = trainable_parameters(model)
    return InjectionReport(adapter_name, tuple(n for n, _ in targets), saved, trainable, total)


def _check_inits(
    model: nn.Module, targets: list[tuple[str, nn.Module]], config: LoraConfig
) -> None:
    """Refuse an init that does not fit some target before any base weight is rewritten."""
    for name, module in targets:
        try:
            check_init_on_layer(lora_class(module), module, config.for_module(name))
        except LorakitError as err:
            raise type(err)(f"module {name!r}: {err}; the model is left as it was") from err
    check_untied(model, targets, config.init)


def _add_adapters(
    targets: list[tuple[str, nn.Module]], config: LoraConfig, adapter_name: str, order: int
) -> None:
    """Adapt each target and add the adapter, marked with `config` and `order` (see
    `adapter_registry`); an error names the adapter and the module."""
    owners = out_proj_owners(targets)  # an MHA's out_proj takes the MHA's rank and alpha
    for name, module in targets:
        try:
            layer = module if isinstance(module, LoraLayer) else lora_class(module).adapt(module)
            module_config = config.for_module(parameter_path(owners.get(name, name)))
            register(layer.add_adapter(adapter_name, module_config), order, config)
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

    @classmethod
    def take(cls, model: nn.Module, targets: list[tuple[str, nn.Module]]) -> _Undo:
        modules = [m for _, m in targets]
        return cls(
            # an unattached ParamLoraLayer has no adapters yet: fresh too
            fresh=[m for m in modules if not isinstance(m, LoraLayer) or not m.lora],
            targets=modules,
            active=[(layer, layer.lora_active) for _, layer in lora_layers(model)],
            requires_grad=[(p, p.requires_grad) for p in model.parameters()],
        )

    def apply(self, adapter_name: str) -> None:
        """Remove `adapter_name` wherever it went, restore classes, active sets and flags."""
        for module in self.targets:
            if isinstance(module, LoraLayer) and adapter_name in module.lora:
                undo_weight_init(module, module.lora[adapter_name])  # PiSSA's residual back
                del module.lora[adapter_name]
        for module in self.fresh:
            if isinstance(module, LoraLayer):
                module.restore()
        for layer, active in self.active:
            layer.lora_active = active
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


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
