"""Which raw parameters `LoraConfig.target_parameters` adapts (PEFT's matching rule).

A parameter is selected when its full name ("model.layers.0.mlp.experts.gate_up_proj") is an
entry or ends with "." + an entry; only parameters a module holds itself count (PEFT's
`named_parameters(recurse=False)`), walked in model order.
"""

from __future__ import annotations

from torch import nn

from .config import LoraConfig
from .errors import TargetNotFoundError, UnsupportedLayerError
from .layers import LoraLayer
from .layers.parameter import (
    PARAMS_ATTR,
    ParamAdapters,
    ParamHolderMixin,
    ParamLoraLayer,
    proxy_path,
)
from .names import name_matches
from .tree import base_modules

_HINT_NAMES = 12


def find_param_targets(
    model: nn.Module, config: LoraConfig, module_targets: list[tuple[str, nn.Module]]
) -> list[tuple[str, ParamLoraLayer]]:
    """(path, ParamLoraLayer) of each parameter `config.target_parameters` selects: the layer
    already on the model (an earlier adapter's) or a new, unattached one.

    Raises:
        TargetNotFoundError: `target_parameters` is set but selects no parameter.
        UnsupportedLayerError: a selected parameter is not 2-D or 3-D floating point, sits on
            the top-level module, or on a module that `targets` adapts as a layer.
    """
    if not config.target_parameters:
        return []
    layers = {id(m) for _, m in module_targets}
    found = []
    for path, module in base_modules(model):
        if isinstance(module, (ParamAdapters, ParamLoraLayer)):
            continue
        for name, param in module._parameters.items():
            full = f"{path}.{name}" if path else name
            if param is None or not name_matches(full, config.target_parameters):
                continue
            _check_target(full, path, module, param, id(module) in layers)
            found.append((proxy_path(path, name), _layer(module, name)))
    if not found:
        raise TargetNotFoundError(
            f"target_parameters={list(config.target_parameters)!r} matched no parameter of "
            f"{type(model).__name__}; " + _hint(model)
        )
    return found


def _check_target(
    full: str, path: str, module: nn.Module, param: nn.Parameter, adapted: bool
) -> None:
    if not path:
        raise UnsupportedLayerError(
            f"cannot adapt the parameter {full!r} of the top-level module (PEFT cannot either); "
            "wrap the model or target a submodule's parameter"
        )
    if adapted or isinstance(module, LoraLayer):
        raise UnsupportedLayerError(
            f"cannot adapt the parameter {full!r}: its module {path!r} is adapted as a layer "
            "(targets); target the module or its parameter, not both"
        )
    if param.ndim not in (2, 3) or not param.is_floating_point():
        raise UnsupportedLayerError(
            f"cannot adapt the parameter {full!r} of shape {tuple(param.shape)} and dtype "
            f"{param.dtype}: target_parameters supports 2-D (out, in) and 3-D (experts, ...) "
            "floating-point parameters"
        )
    if hasattr(module, "parametrizations"):
        raise UnsupportedLayerError(
            f"cannot adapt the parameter {full!r}: its module {path!r} is parametrized "
            "(torch.nn.utils.parametrize)"
        )


def _layer(module: nn.Module, name: str) -> ParamLoraLayer:
    if isinstance(module, ParamHolderMixin):
        existing = getattr(module, PARAMS_ATTR)._modules.get(name)
        if existing is not None:
            return existing
    return ParamLoraLayer(module, name)


def _hint(model: nn.Module) -> str:
    """The parameters that could be named: 2-D / 3-D floats outside Linear-like layers."""
    names: dict[str, None] = {}
    for path, module in base_modules(model):
        for name, p in module._parameters.items():
            if path and p is not None and p.ndim == 3 and p.is_floating_point():
                names[f"{path.rpartition('.')[2]}.{name}"] = None
    shown = list(names)[:_HINT_NAMES]
    if not shown:
        return "it has no 3-D (expert) parameters; name a 2-D one by its full name"
    return f"its 3-D (expert) parameters are named {shown} (a name matches a name's end)"
