"""`LoraLayer`: what every adapted layer shares.

An adapted layer *is* its base layer with a LoRA mixin put in front of its class, the way
`torch.nn.utils.parametrize` does it: parameter names (`weight`, `bias`), attributes and
`isinstance` checks stay those of the base layer, so base checkpoints load unchanged, and
`restore()` gives back the original class exactly.

    forward(x) = base(x) + sum over active, unmerged adapters of s_a * B_a(A_a(drop(x)))
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import AdapterError, MergeError
from ..functional import merged_weight
from .lora import LoRA


class LoraLayer(nn.Module):
    """Mixin placed before a base layer class; subclasses define the per-type math.

    State (plain attributes, so the module pickles, prints and compiles):
        lora: ModuleDict adapter name -> LoRA.
        lora_active: names whose deltas are added, in order.
        lora_merged: names currently folded into `weight`.
        lora_disabled: when True the layer computes its base output only.
        lora_routing: None, or per-row adapter routing set by `lorakit.routing` (mixed batches).
    """

    base_class: ClassVar[type[nn.Module]]
    lora: nn.ModuleDict
    lora_active: tuple[str, ...]
    lora_merged: tuple[str, ...]
    lora_disabled: bool
    lora_routing: object | None

    # -- per-type hooks -------------------------------------------------------------------
    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """(in_features, out_features, kernel_size) of the adapter this layer takes."""
        raise NotImplementedError

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        """The adapter's contribution to this layer's output for input x."""
        raise NotImplementedError

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """Turn s * B A (out, in, *kernel) into the layout of `self.weight`."""
        return delta

    is_embedding: ClassVar[bool] = False

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def adapt(cls, module: nn.Module) -> LoraLayer:
        """Turn `module` (an instance of `cls.base_class`) into this class, in place."""
        module.__class__ = cls
        module.lora = nn.ModuleDict()
        module.lora_active = ()
        module.lora_merged = ()
        module.lora_disabled = False
        module.lora_routing = None
        return module  # type: ignore[return-value]

    def restore(self) -> nn.Module:
        """Drop every adapter (without merging) and give back the base class, in place."""
        del self.lora
        for attr in ("lora_active", "lora_merged", "lora_disabled", "lora_routing"):
            self.__dict__.pop(attr, None)
        self.__class__ = type(self).base_class
        return self

    def add_adapter(self, name: str, config: LoraConfig) -> LoRA:
        """Create adapter `name` from `config` (already specialised to this module)."""
        if name in self.lora:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        in_features, out_features, kernel = self.lora_dims()
        weight = self.weight
        adapter = LoRA(
            in_features,
            out_features,
            config.rank,
            config.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            kernel_size=kernel,
            embedding=self.is_embedding,
            device=weight.device,
            dtype=config.dtype or weight.dtype,
        )
        self.lora[name] = adapter
        self.lora_active = (*self.lora_active, name)
        return adapter

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if it is merged)."""
        if name in self.lora_merged:
            self.unmerge((name,))
        del self.lora[name]
        self.lora_active = tuple(a for a in self.lora_active if a != name)

    # -- merge ----------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """s * B A of adapter `name`, in the layout and on the device of `self.weight`."""
        return self.to_weight_layout(self.lora[name].delta_weight())

    def merge(self, names: tuple[str, ...] | None = None) -> None:
        """Fold adapters (default: the active ones) into `weight`; merged ones are skipped."""
        for name in self.lora_active if names is None else names:
            if name in self.lora_merged:
                continue
            with torch.no_grad():
                new = merged_weight(self.weight, self.delta_weight(name))
                if not new.is_meta and not torch.isfinite(new).all():
                    raise MergeError(
                        f"merging adapter {name!r} would write NaN or inf into a base weight "
                        f"of shape {tuple(self.weight.shape)}; the weight is left unchanged"
                    )
                self.weight.copy_(new)
            self.lora_merged = (*self.lora_merged, name)

    def unmerge(self, names: tuple[str, ...] | None = None) -> None:
        """Take merged adapters (default: all merged) out of `weight` again."""
        for name in self.lora_merged if names is None else names:
            if name not in self.lora_merged:
                continue
            with torch.no_grad():
                self.weight.copy_(merged_weight(self.weight, self.delta_weight(name), sign=-1))
            self.lora_merged = tuple(m for m in self.lora_merged if m != name)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """base(x) + the deltas of the active adapters that are not merged."""
        y = self.base_class.forward(self, x)
        if self.lora_disabled:
            return y
        if self.lora_routing is not None:  # a mixed-adapter batch: see lorakit.routing
            return self.lora_routing.add_delta(self, x, y)
        for name in self.lora_active:
            if name not in self.lora_merged:
                y = y + self.lora_delta(self.lora[name], x).to(y.dtype)
        return y
