"""LoRA on raw parameters (`LoraConfig.target_parameters`): PEFT's `lora.ParamWrapper`.

Mixture-of-experts models keep their experts as one 3-D parameter that their module indexes
itself (transformers v5: `mlp.experts.gate_up_proj` of shape (E, 2 * inter, hidden)), so there
is no Linear to adapt. PEFT adapts the parameter: while the module that holds it runs, the
parameter reads as W + delta (one rank-r LoRA per expert, `ExpertLoRA`); outside, it is W.

lorakit does the same with two pieces:
- `ParamLoraLayer`: one adapted parameter, a `LoraLayer` whose `weight` *is* the holder's
  parameter, so adapters, activation, merge / unmerge (exact), disable, delete and unload are
  the ones every layer has. It lives at `<holder>.lora_parameters.<name>`.
- the holder gets `ParamHolderMixin` in front of its class (as layers get theirs): its forward
  shadows each adapted parameter with W + delta (the instance attribute wins over
  `nn.Module.__getattr__`), runs the original forward, and removes the shadows. The base
  parameters keep their names, so base checkpoints load unchanged.

Layouts (PEFT's): a 2-D parameter is (out, in); a 3-D one is (E, out, in), or (E, in, out)
when its module says `is_transposed = True` (transformers' gpt-oss experts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import AdapterError, ConfigError, UnsupportedLayerError
from ..functional import merged_weight
from .base import _STATE, LoraLayer
from .expert_lora import ExpertLoRA

PARAMS_ATTR = "lora_parameters"  # the holder's child that holds its ParamLoraLayers
_FOLD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def proxy_path(holder_path: str, param_name: str) -> str:
    """The module path of the `ParamLoraLayer` of `holder_path`'s parameter `param_name`."""
    return f"{holder_path}.{PARAMS_ATTR}.{param_name}"


def parameter_path(path: str) -> str:
    """The parameter's own name for a `ParamLoraLayer` path (`proxy_path`'s inverse), so
    rank / alpha patterns and base fingerprints see "experts.gate_up_proj"; other paths as
    they are."""
    head, sep, name = path.rpartition(f".{PARAMS_ATTR}.")
    return f"{head}.{name}" if sep else path


class ParamAdapters(nn.ModuleDict):
    """The holder's {parameter name: ParamLoraLayer}; a type of its own so walks skip it."""


class ParamLoraLayer(LoraLayer):
    """One adapted parameter of a holder module; see the module docstring.

    Created unattached by `find_targets` (nothing on the model changes until an adapter is
    added); `add_adapter` attaches it, `restore` detaches it (and gives the holder its class
    back when it was the last).
    """

    base_class = nn.Module

    def __init__(self, holder: nn.Module, param_name: str) -> None:
        nn.Module.__init__(self)
        self.__dict__["lora_holder"] = holder  # a plain reference: not a submodule
        self.param_name = param_name
        self.lora = nn.ModuleDict()
        self.lora_active = ()
        self.lora_merged = ()
        self.lora_disabled = False
        self.lora_routing = None
        self.lora_original = None
        self.train(holder.training)

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        """The adapted parameter itself (merges write into it in place)."""
        return self.lora_holder._parameters[self.param_name]

    def layout(self) -> tuple[int, int, int, bool]:
        """(experts, in, out, transposed): PEFT's reading of the parameter's shape."""
        shape = self.weight.shape
        if len(shape) == 2:
            return 1, shape[1], shape[0], False
        experts, d1, d2 = shape
        if getattr(self.lora_holder, "is_transposed", False):
            return experts, d1, d2, True
        return experts, d2, d1, False

    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        _, in_features, out_features, _ = self.layout()
        return in_features, out_features, ()

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Shapes of lora_A (r * E, in) and lora_B (out, r * E) at rank `rank`."""
        experts, in_features, out_features, _ = self.layout()
        return (rank * experts, in_features), (out_features, rank * experts)

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """(E, out, in) -> the parameter's layout and shape."""
        if self.layout()[3]:
            delta = delta.transpose(-2, -1)
        return delta.reshape(self.weight.shape)

    # -- life cycle ---------------------------------------------------------------------
    def _build_adapter(self, name: str, config: LoraConfig) -> ExpertLoRA:
        experts, in_features, out_features, _ = self.layout()
        weight = self.weight
        dtype = config.dtype or weight.dtype
        try:
            return ExpertLoRA(
                in_features, out_features, config.rank, config.alpha, num_experts=experts,
                use_rslora=config.use_rslora, init=config.init, device=weight.device, dtype=dtype,
            )  # fmt: skip
        except ConfigError as err:
            raise ConfigError(f"adapter {name!r}: {err}") from err
        except (RuntimeError, MemoryError) as err:
            raise AdapterError(
                f"cannot build adapter {name!r} with rank={config.rank}, dtype={dtype} for the "
                f"parameter {self.param_name!r} of shape {tuple(weight.shape)}: {err}"
            ) from err

    def add_adapter(self, name: str, config: LoraConfig) -> ExpertLoRA:
        adapter = super().add_adapter(name, config)
        holder = self.lora_holder
        if not isinstance(holder, ParamHolderMixin):
            holder.__class__ = holder_class(type(holder))
            setattr(holder, PARAMS_ATTR, ParamAdapters())
        if getattr(holder, PARAMS_ATTR)._modules.get(self.param_name) is not self:
            getattr(holder, PARAMS_ATTR)[self.param_name] = self
        return adapter  # type: ignore[return-value]

    def restore(self) -> nn.Module:
        """Drop every adapter (without merging), detach from the holder; returns the holder."""
        holder = self.lora_holder
        adapters = getattr(holder, PARAMS_ATTR) if isinstance(holder, ParamHolderMixin) else None
        if adapters is not None and adapters._modules.get(self.param_name) is self:
            del adapters[self.param_name]
        if adapters is not None and not len(adapters):
            delattr(holder, PARAMS_ATTR)
            holder.__class__ = holder.base_class
        self.lora = nn.ModuleDict()
        for attr in _STATE:
            setattr(self, attr, None if attr in ("lora_routing", "lora_original") else ())
        self.lora_disabled = False
        return holder

    # -- forward ------------------------------------------------------------------------
    def forward(self, *args: object, **kwargs: object) -> Tensor:
        raise TypeError(f"{type(self).__name__} is not called: its holder module's forward is")

    def effective_weight(self) -> Tensor | None:
        """W + the deltas of the active, unmerged adapters; None when W reads as itself."""
        if self.lora_disabled:
            return None
        names = [n for n in self.lora_active if n not in self.lora_merged]
        routing = self.lora_routing
        if routing is not None:
            if any(n in self.lora for n in routing.names):
                raise UnsupportedLayerError(
                    f"mixed-adapter batches do not support target_parameters (parameter "
                    f"{self.param_name!r}); PEFT does not either"
                )
            return None
        if not names:
            return None
        weight = self.weight
        if weight.dtype not in _FOLD_DTYPES:  # float8 and the like: add in a wider dtype
            delta = sum(self.delta_weight(n) for n in names)
            return merged_weight(weight, delta)
        with torch.autocast(weight.device.type, enabled=False):  # stay in W's dtype (PEFT)
            for name in names:
                weight = self._folded(weight, self.lora[name])
        return weight

    def _folded(self, weight: Tensor, adapter: ExpertLoRA) -> Tensor:
        """weight + s * B_e A_e in the parameter's layout, without forming the delta first."""
        b, a = (t.to(weight.dtype) for t in adapter.expert_factors())
        lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if self.layout()[3] else (b, a)
        if weight.ndim == 2:
            return torch.addmm(weight, lhs[0], rhs[0], alpha=adapter.scaling)
        return torch.baddbmm(weight, lhs, rhs, alpha=adapter.scaling)

    def extra_repr(self) -> str:
        return f"parameter={self.param_name!r}, shape={tuple(self.weight.shape)}"


class ParamHolderMixin(nn.Module):
    """Put before the class of a module whose parameters are adapted: its forward runs with
    each adapted parameter reading as W + delta."""

    base_class: ClassVar[type[nn.Module]]
    lora_parameters: ParamAdapters

    def forward(self, *args: object, **kwargs: object) -> object:
        with shadowed_parameters(self):
            return self.base_class.forward(self, *args, **kwargs)


@contextmanager
def shadowed_parameters(holder: ParamHolderMixin) -> Iterator[None]:
    """Within the block, `holder.<name>` is W + delta for each adapted parameter."""
    shadowed = []
    try:
        for name, layer in getattr(holder, PARAMS_ATTR).items():
            weight = layer.effective_weight()
            if weight is not None:
                holder.__dict__[name] = weight
                shadowed.append(name)
        yield
    finally:
        for name in shadowed:
            holder.__dict__.pop(name, None)


@cache
def holder_class(base: type[nn.Module]) -> type[ParamHolderMixin]:
    """The holder class for `base`: the mixin in front, `base`'s own forward behind it."""
    namespace = {"base_class": base, "__reduce_ex__": _reduce_holder}
    return type(f"LoRAParams{base.__name__}", (ParamHolderMixin, base), namespace)


def _reduce_holder(self: ParamHolderMixin, protocol: int) -> tuple:
    # made by `holder_class`, so not importable by name: pickle says how to remake it
    return _new_holder, (type(self).base_class,), self.__getstate__()


def _new_holder(base: type[nn.Module]) -> ParamHolderMixin:
    cls = holder_class(base)
    return cls.__new__(cls)
