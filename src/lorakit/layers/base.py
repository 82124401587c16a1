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
from ..errors import AdapterError, ConfigError, MergeError
from ..functional import merged_weight
from .dora import DoRA, check_dora_layer, dora_forward, dora_merged, dora_unmerged, weight_rows
from .lora import LoRA
from .lora_bias import bias_step, check_lora_bias_layer, no_bias_refusal, with_biases
from .routing_hook import RoutingHook
from .weight_init import apply_weight_init, check_init_on_layer

# The plain attributes `adapt` adds (besides the `lora` ModuleDict) and `restore` removes.
_STATE = (
    "lora_active", "lora_merged", "lora_disabled", "lora_routing", "lora_original",
    "lora_original_bias",
    "lora_fusion",  # set by lorakit.shared_input_links
)  # fmt: skip


class LoraLayer(nn.Module):
    """Mixin placed before a base layer class; subclasses define the per-type math.

    State (plain attributes, so the module pickles, prints and compiles):
        lora: ModuleDict adapter name -> LoRA.
        lora_active: names whose deltas are added, in order.
        lora_merged: names currently folded into `weight`.
        lora_disabled: when True the layer computes its base output only.
        lora_routing: None, or the `RoutingHook` that `lorakit.routing` sets for a mixed-adapter
            batch; `forward` then adds its per-row deltas instead of the active adapters'.
        lora_original: None, or a copy of `weight` from before the first merge (see `merge`);
            a plain attribute, so never in the state dict.
        lora_original_bias: the same for `bias` (adapters with `lora_bias` merge into it).
    """

    base_class: ClassVar[type[nn.Module]]
    lora: nn.ModuleDict
    lora_active: tuple[str, ...]
    lora_merged: tuple[str, ...]
    lora_disabled: bool
    lora_routing: RoutingHook | None
    lora_original: Tensor | None

    # -- per-type hooks -------------------------------------------------------------------
    def lora_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """(in_features, out_features, kernel_size) of the adapter this layer takes."""
        raise NotImplementedError

    def lora_delta(self, adapter: LoRA, x: Tensor) -> Tensor:
        """The adapter's contribution to this layer's output for input x."""
        raise NotImplementedError

    def lora_groups(self) -> int:
        """The groups of B (a grouped conv's; 1 elsewhere): reads only base attributes."""
        return 1

    def to_weight_layout(self, delta: Tensor) -> Tensor:
        """Turn s * B A (out, in, *kernel) into the layout of `self.weight`."""
        return delta

    is_embedding: ClassVar[bool] = False
    supports_dora: ClassVar[bool] = False  # DoRA's math is written for (out, in) weights

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def adapt(cls, module: nn.Module) -> LoraLayer:
        """Turn `module` (an instance of `cls.base_class`) into this class, in place."""
        module.__class__ = cls
        module.lora = nn.ModuleDict().train(module.training)
        module.lora_active = ()
        module.lora_merged = ()
        module.lora_disabled = False
        module.lora_routing = None
        module.lora_original = None
        module.lora_original_bias = None
        return module  # type: ignore[return-value]

    def restore(self) -> nn.Module:
        """Drop every adapter (without merging) and give back the base class, in place."""
        del self.lora
        for attr in _STATE:
            self.__dict__.pop(attr, None)
        self.__class__ = type(self).base_class
        return self

    def add_adapter(self, name: str, config: LoraConfig) -> LoRA:
        """Create adapter `name` from `config` (already specialised to this module)."""
        if name in self.lora:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        adapter = self._build_adapter(name, config)
        if config.init == "loftq":  # fitted to this layer's weight: see lorakit.loftq
            from ..loftq import init_from_base

            init_from_base(self, adapter)
        adapter.train(self.training)  # a new module starts in training mode; follow the layer's
        self.lora[name] = adapter
        self.lora_active = (*self.lora_active, name)
        return adapter

    def _build_adapter(self, name: str, config: LoraConfig) -> LoRA:
        """A new LoRA for this layer; a failure to allocate or initialise it (a rank too large
        for memory, a dtype without kernels) becomes an AdapterError naming the values."""
        in_features, out_features, kernel = self.lora_dims()
        weight = self.weight
        dtype = config.dtype or weight.dtype
        if config.use_dora:
            check_dora_layer(self)
        if config.lora_bias:
            check_lora_bias_layer(self)
        check_init_on_layer(type(self), self, config)
        try:
            adapter = (DoRA if config.use_dora else LoRA)(
                in_features,
                out_features,
                config.rank,
                config.alpha,
                dropout=config.dropout,
                use_rslora=config.use_rslora,
                init=config.init,
                kernel_size=kernel,
                embedding=self.is_embedding,
                groups=self.lora_groups(),
                lora_bias=config.lora_bias,
                device=weight.device,
                dtype=dtype,
            )
            apply_weight_init(self, adapter)  # PiSSA / OLoRA / MiCA; before DoRA's m
            if isinstance(adapter, DoRA):
                adapter.reset_magnitude(weight, weight_rows(self, weight))
            return adapter
        except ConfigError as err:  # e.g. a scale this dtype cannot hold
            raise ConfigError(f"adapter {name!r}: {err}") from err
        except (RuntimeError, MemoryError) as err:  # NotImplementedError is a RuntimeError
            cause = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise AdapterError(
                f"cannot build adapter {name!r} with rank={config.rank}, dtype={dtype} for a "
                f"weight of shape {tuple(weight.shape)}: {cause}"
            ) from err

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

    def merge(self, names: tuple[str, ...] | None = None, keep_original: bool = True) -> None:
        """Fold adapters (default: the active ones) into `weight`; merged ones are skipped.

        With `keep_original` the first merge keeps a copy of the unmerged `weight` (one weight
        of memory per layer, held only while something is merged), so `unmerge` gives the
        weight back bit for bit. Without it `unmerge` subtracts, which rounds: see
        `lorakit.merge.merge` for the bound.

        Raises:
            MergeError: the merged weight would hold NaN or inf; nothing of it is written. Or
                the layer cannot take an adapter (`merge_refusal`); nothing is written.
        """
        wanted = dict.fromkeys(self.lora_active if names is None else names)
        todo = [n for n in wanted if n not in self.lora_merged]
        for name in todo:  # before any write
            refusal = self.merge_refusal(name)
            if refusal is not None:
                raise MergeError(refusal)
        first = keep_original and bool(todo) and not self.lora_merged
        original = self.weight.detach().clone() if first else None
        bias = getattr(self, "bias", None)
        original_bias = bias.detach().clone() if first and bias is not None else None
        for name in todo:
            with torch.no_grad():
                new = self._merge_step(self.weight, name)
                new_bias = None if bias is None else bias_step(self, bias, name)
                self._check_finite(name, new, new_bias)
                self.weight.copy_(new)
                if new_bias is not None:
                    bias.copy_(new_bias)
            self.lora_merged = (*self.lora_merged, name)
            if original is not None:  # kept only once a merge went in
                self.lora_original, original = original, None
                self.lora_original_bias = original_bias

    def _check_finite(self, name: str, *tensors: Tensor | None) -> None:
        """Refuse to write NaN or inf (a merged weight or bias) into the base."""
        for t in tensors:
            if t is not None and not t.is_meta and not torch.isfinite(t).all():
                raise MergeError(
                    f"merging adapter {name!r} would write NaN or inf into a base weight of "
                    f"shape {tuple(self.weight.shape)}; the weight is left unchanged"
                )

    def merge_refusal(self, adapter_name: str) -> str | None:
        """Why adapter `adapter_name` cannot be merged into this layer, or None: it can.
        Here: a `lora_bias` with no base bias to take it."""
        return no_bias_refusal(self, adapter_name)

    def unmerge(self, names: tuple[str, ...] | None = None) -> None:
        """Take merged adapters (default: all merged) out of `weight` again.

        Exact (the kept original plus the adapters still merged) when `merge` kept the
        original and `weight` has not changed since; otherwise each delta is subtracted.
        """
        out = [n for n in self.lora_merged if names is None or n in names]
        if not out:
            return
        keep = tuple(n for n in self.lora_merged if n not in out)
        original = self._exact_original()
        with torch.no_grad():
            if original is not None:
                self.weight.copy_(self._with_deltas(original, keep))
            elif any(isinstance(self.lora[n], DoRA) for n in self.lora_merged):
                # DoRA rescales what came before it: undo all in reverse, then merge `keep` again
                base = self._undone(self.weight, self.lora_merged)
                self.weight.copy_(self._with_deltas(base, keep))
            else:
                for name in out:
                    delta = self.delta_weight(name)
                    self.weight.copy_(merged_weight(self.weight, delta, sign=-1))
            self._unmerge_bias(out, keep)
        self.lora_merged = keep
        if not keep:
            self.lora_original = None  # free the copy: nothing is merged
            self.lora_original_bias = None

    def _unmerge_bias(self, out: list[str], keep: tuple[str, ...]) -> None:
        """Take the lora biases of `out` out of `bias`: exact from the kept original bias
        when `bias` is still it plus the merged ones, else by subtraction (rounds)."""
        bias = getattr(self, "bias", None)
        if bias is None or all(self.lora[n].lora_bias is None for n in out):
            return
        original = self._exact_original_bias()
        if original is not None:
            bias.copy_(with_biases(self, original, keep))
            return
        for name in out:
            new = bias_step(self, bias, name, sign=-1)
            if new is not None:
                bias.copy_(new)

    def _exact_original_bias(self) -> Tensor | None:
        """The kept unmerged bias, if `bias` is still exactly it plus the merged lora biases."""
        original = getattr(self, "lora_original_bias", None)
        bias = getattr(self, "bias", None)
        if original is None or bias is None or (original.shape, original.dtype) != (
            bias.shape, bias.dtype
        ):
            return None
        original = original.to(bias.device)
        if bias.is_meta:
            return original
        same = torch.equal(with_biases(self, original, self.lora_merged), bias)
        return original if same else None

    def _with_deltas(self, weight: Tensor, names: tuple[str, ...]) -> Tensor:
        """`weight` (unmerged) with `names` merged one by one in order, as `merge` does."""
        base = weight
        for name in names:
            weight = self._merge_step(weight, name, base)
        return weight

    def _merge_step(self, weight: Tensor, name: str, base: Tensor | None = None) -> Tensor:
        """`weight` with adapter `name` merged: plus s B A, or DoRA's rescaled sum, whose
        norm is of the unmerged `base` (default: worked out from the layer's state)."""
        adapter = self.lora[name]
        if isinstance(adapter, DoRA):
            base = self._unmerged_weight() if base is None else base
            return dora_merged(self, adapter, weight, base)
        return merged_weight(weight, self.delta_weight(name))

    def _undone(self, weight: Tensor, names: tuple[str, ...]) -> Tensor:
        """`weight` with the merged `names` taken out again, last first (rounds)."""
        for name in reversed(names):
            adapter = self.lora[name]
            if isinstance(adapter, DoRA):
                weight = dora_unmerged(self, adapter, weight)
            else:
                weight = merged_weight(weight, self.delta_weight(name), sign=-1)
        return weight

    def _unmerged_weight(self) -> Tensor:
        """The base weight without any merged adapter: `weight` itself when none is merged,
        else the kept original when exact, else a copy with the merges undone (rounds)."""
        if not self.lora_merged:
            return self.weight
        original = self._exact_original()
        if original is not None:
            return original
        with torch.no_grad():
            factors = {n: self.lora[n].merged_factor for n in self.lora_merged
                       if isinstance(self.lora[n], DoRA)}  # fmt: skip
            weight = self._undone(self.weight.detach().clone(), self.lora_merged)
            for name, f in factors.items():  # a look only: the adapters stay merged
                self.lora[name].merged_factor = f
        return weight

    def _exact_original(self) -> Tensor | None:
        """The kept unmerged weight, if `weight` is still exactly it plus the merged deltas.

        The check recomputes the merged weight rather than trusting the copy, so a weight
        changed while merged (load_state_dict, a dtype cast, a deep copy) is never undone.
        """
        original = getattr(self, "lora_original", None)
        weight = self.weight
        if original is None or (original.shape, original.dtype) != (weight.shape, weight.dtype):
            return None
        original = original.to(weight.device)
        if weight.is_meta:
            return original
        with torch.no_grad():
            same = torch.equal(self._with_deltas(original, self.lora_merged), weight)
        return original if same else None

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
                adapter = self.lora[name]
                if isinstance(adapter, DoRA):  # rescales y: see lorakit.layers.dora
                    y = dora_forward(self, adapter, x, y, self._unmerged_weight())
                else:
                    y = y + self.lora_delta(adapter, x).to(y.dtype)
        return y
