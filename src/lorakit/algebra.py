"""Adapter algebra: new adapters from old ones, with the numbers of PEFT's add_weighted_adapter.

For adapters i with weights w_i, scales s_i and factors A_i (r_i, in, *k), B_i (out, r_i, *1),
every method gives factors of scale 1 (alpha = rank, PEFT's convention):

    cat     A = [w_i s_i A_i] stacked, B = [B_i] side by side: exactly sum_i w_i s_i B_i A_i,
            of rank sum_i r_i
    linear  A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i: one rank,
            but the cross terms B_i A_j make it an approximation (PEFT's "linear")
    svd     the exact sum truncated to its top `rank` singular values (default: the largest rank
            combined; never more than the sum can have)

A layer that holds only some of the adapters combines those (the others add nothing there).
`compress` is the svd of one adapter, in place. Unlike PEFT, one adapter keeps the method asked
for (PEFT switches a single adapter to "linear"), and the result never takes rsLoRA's scale
(PEFT's keeps `use_rslora`, which multiplies its exact sums by sqrt(rank)).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from .adapter_registry import (
    adapter_configs,
    adapter_order,
    next_order,
    register,
)
from .config import LoraConfig, check_choice, check_rank
from .errors import AdapterError, ConfigError
from .inject import freeze_base
from .layers import LoRA
from .spectrum import LowRankSVD, check_rank_fits, factor_svd, relative_error
from .tree import lora_layers

Method = Literal["cat", "linear", "svd"]
METHODS: tuple[str, ...] = get_args(Method)


class _Term(NamedTuple):
    """One adapter of a combination on one layer."""

    name: str
    adapter: LoRA
    weight: float


class _Factors(NamedTuple):
    """New factors (scale 1) for a layer; `like` is an adapter of the layer to copy shapes from."""

    like: LoRA
    A: Tensor
    B: Tensor


@dataclasses.dataclass(frozen=True)
class LayerCompression:
    """How `compress` changed one layer: ranks before and after, and the relative error
    ||delta - new delta||_F / ||delta||_F (0 when the rank kept covers the delta's own)."""

    module: str
    rank_before: int
    rank: int
    relative_error: float


def combine(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    method: Method = "cat",
    new_name: str = "combined",
    rank: int | None = None,
) -> dict[str, int]:
    """Add adapter `new_name`, the weighted combination of adapters `names` (see the module
    docstring for the methods); weights may be negative. Like PEFT's, the new adapter is
    inactive and frozen: `set_active(model, new_name)` to use it. All or nothing.

    Returns:
        {layer path: rank of the new adapter there}.

    Raises:
        AdapterError: a name is unknown, repeated, or `new_name` is taken or not an identifier.
        ConfigError: a bad `method`, `weights` or `rank` (0, or above a layer's size), a DoRA
            adapter or one with lora_bias, a grouped conv, or "linear" over adapters of
            different ranks on one layer.
    """
    names, weights = _check_combine(model, names, weights, method, new_name, rank)
    default = max(layer.lora[n].rank for _, layer in lora_layers(model) for n in names
                  if n in layer.lora)  # fmt: skip
    factors: dict[str, _Factors] = {}
    for path, layer in lora_layers(model):
        terms = [_Term(n, layer.lora[n], w) for n, w in zip(names, weights) if n in layer.lora]
        if terms:
            factors[path] = _combined(path, terms, method, rank, default)
    _install(model, new_name, factors, adapter_configs(model)[names[0]], next_order(model))
    freeze_base(model)
    return {path: f.A.shape[0] for path, f in factors.items()}


def compress(model: nn.Module, name: str, rank: int) -> list[LayerCompression]:
    """Replace adapter `name` by the truncated SVD of each layer's delta s * B A, at most
    `rank` (exact where the delta's rank is <= `rank`); it stays active if it was.

    Raises:
        AdapterError: `name` is unknown or merged (unmerge first).
        ConfigError: `rank` is not positive or above a layer's size; `name` is DoRA, has
            lora_bias or sits on a grouped conv.
    """
    _check_names(model, (name,))
    check_rank(rank)
    factors: dict[str, _Factors] = {}
    report = []
    for path, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        if name in layer.lora_merged:
            raise AdapterError(f"adapter {name!r} is merged into {path!r}; unmerge it first")
        adapter = layer.lora[name]
        _check_size(path, adapter, rank)
        svd = factor_svd(adapter.lora_A, adapter.lora_B, adapter.scaling)
        kept = min(rank, len(svd.S))
        factors[path] = _truncated(adapter, svd, kept, adapter.lora_A.dtype)
        report.append(LayerCompression(path, adapter.rank, kept, relative_error(svd.S, kept)))
    _install(model, name, factors, adapter_configs(model)[name], adapter_order(model, name))
    freeze_base(model)
    return report


# -- checks -----------------------------------------------------------------------------------
def _check_names(model: nn.Module, names: tuple[str, ...]) -> None:
    """Known, plain LoRA adapters (not DoRA, no lora_bias), on no grouped conv."""
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise AdapterError(f"unknown adapter(s) {unknown}; the model has {list(configs)}")
    for name in names:
        if configs[name].use_dora:
            raise ConfigError(
                f"adapter {name!r} is DoRA (use_dora=True); adapter algebra works on plain "
                "LoRA adapters only"
            )
        if configs[name].lora_bias:
            raise ConfigError(
                f"adapter {name!r} has lora_bias=True; adapter algebra works on plain LoRA "
                "adapters only"
            )
        if configs[name].target_parameters:  # per-expert factors: PEFT refuses these too
            raise ConfigError(
                f"adapter {name!r} adapts raw parameters (target_parameters); adapter algebra "
                "works on layer adapters only"
            )
        if configs[name].trainable_token_indices is not None:  # rows, not factors
            raise ConfigError(
                f"adapter {name!r} trains token rows (trainable_token_indices); adapter "
                "algebra works on plain LoRA adapters only"
            )
    for path, layer in lora_layers(model):
        if layer.lora_groups() != 1 and any(n in layer.lora for n in names):
            raise ConfigError(
                f"layer {path!r} is a conv with groups={layer.lora_groups()}; adapter algebra "
                "works on ungrouped layers only"
            )


def _check_combine(
    model: nn.Module,
    names: object,
    weights: object,
    method: object,
    new_name: object,
    rank: object,
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    check_choice(method, "method", METHODS)
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise AdapterError(f"names must be a non-empty list of adapter names, got {names!r}")
    names = tuple(names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AdapterError(f"names lists adapter(s) {repeated} more than once")
    _check_names(model, names)
    if not isinstance(new_name, str) or not new_name.isidentifier():
        raise AdapterError(f"new_name must be a plain identifier, got {new_name!r}")
    if new_name in adapter_configs(model):
        raise AdapterError(f"new_name {new_name!r} is already an adapter on the model")
    if rank is not None and method != "svd":
        raise ConfigError(f"rank applies to method='svd' only, got rank={rank!r} with {method!r}")
    if rank is not None:
        check_rank(rank)
    return names, _check_weights(weights, len(names))


def _check_weights(weights: object, count: int) -> tuple[float, ...]:
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ConfigError(f"weights must be a list of numbers, got {weights!r}")
    if len(weights) != count:
        raise ConfigError(f"weights has {len(weights)} values for {count} adapters: {weights!r}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {w!r} in {list(weights)!r}")
    return tuple(float(w) for w in weights)


def _check_size(path: str, adapter: LoRA, rank: int) -> None:
    """`rank` must fit the layer's delta (out x in * kernel)."""
    check_rank_fits(rank, adapter.out_features, adapter.lora_A[0].numel(), path)


# -- the methods --------------------------------------------------------------------------------
def _combined(
    path: str, terms: list[_Term], method: str, rank: int | None, default: int
) -> _Factors:
    """The new factors on the layer at `path` from `terms`, by `method`."""
    dtype = _wider(*(t.adapter.lora_A.dtype for t in terms))
    work = _wider(dtype, torch.float32)
    if method == "linear":
        A, B = _linear(path, terms, work)
        return _Factors(terms[0].adapter, A.to(dtype), B.to(dtype))
    A, B = _cat(terms, work)
    if method == "cat":
        return _Factors(terms[0].adapter, A.to(dtype), B.to(dtype))
    like = terms[0].adapter
    if rank is not None:
        _check_size(path, like, rank)
    out, size = like.out_features, like.lora_A[0].numel()
    svd = factor_svd(A, B)
    kept = min(rank or default, out, size, len(svd.S))
    return _truncated(like, svd, kept, dtype)


def _cat(terms: list[_Term], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A = [w_i s_i A_i] stacked, B = [B_i] side by side (PEFT's "cat")."""
    As = [t.adapter.lora_A.detach().to(dtype) * (t.weight * t.adapter.scaling) for t in terms]
    Bs = [t.adapter.lora_B.detach().to(dtype) for t in terms]
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _linear(path: str, terms: list[_Term], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """sqrt(|w_i s_i|) on both factors, the sign on A's (PEFT's "linear"); one rank only."""
    ranks = {t.name: t.adapter.rank for t in terms}
    if len(set(ranks.values())) > 1:
        raise ConfigError(
            f"method='linear' needs adapters of one rank, but on layer {path!r} the ranks are "
            f"{ranks}; use method='cat' or 'svd'"
        )
    A = B = 0
    for t in terms:
        scaled = t.weight * t.adapter.scaling
        root = math.sqrt(abs(scaled))
        sign = 1.0 if scaled >= 0 else -1.0
        A = A + t.adapter.lora_A.detach().to(dtype) * (sign * root)
        B = B + t.adapter.lora_B.detach().to(dtype) * root
    return A, B


def _truncated(like: LoRA, svd: LowRankSVD, rank: int, dtype: torch.dtype) -> _Factors:
    """The rank-`rank` factors of `svd`, shaped like `like`'s A and B, in `dtype`."""
    return _Factors(like, *svd.factors_like(rank, like.lora_A, like.lora_B, dtype))


def _wider(*dtypes: torch.dtype) -> torch.dtype:
    wide = dtypes[0]
    for dtype in dtypes[1:]:
        wide = torch.promote_types(wide, dtype)
    return wide


# -- installing the result ----------------------------------------------------------------------
def _install(
    model: nn.Module, name: str, factors: dict[str, _Factors], base: LoraConfig, order: int
) -> None:
    """Put adapter `name` with `factors` on their layers (replacing one of that name), marked
    with a config that saves and reloads them (PEFT too); all or nothing."""
    config = _derived_config(base, factors)
    done: list[tuple[nn.Module, LoRA | None]] = []
    try:
        for path, new in factors.items():
            layer = model.get_submodule(path)
            old = layer.lora[name] if name in layer.lora else None
            adapter = _adapter_like(new, config.for_module(path))
            register(adapter, order, config)
            layer.lora[name] = adapter
            done.append((layer, old))
    except BaseException:
        for layer, old in reversed(done):
            if old is None:
                del layer.lora[name]
            else:
                layer.lora[name] = old
        raise


def _derived_config(base: LoraConfig, factors: dict[str, _Factors]) -> LoraConfig:
    """`base` with the new ranks, alpha = rank (scale 1), the layers named one by one, and
    patterns (exact paths) where a layer's rank is not the top one."""
    ranks = {path: f.A.shape[0] for path, f in factors.items()}
    top = max(ranks.values())
    pattern = {re.escape(path): r for path, r in ranks.items() if r != top}
    return dataclasses.replace(
        base,
        rank=top,
        alpha=float(top),
        targets=tuple(ranks),
        exclude=(),
        rank_pattern=pattern,
        alpha_pattern={key: float(r) for key, r in pattern.items()},
        use_rslora=False,
        use_dora=False,
        init="zeros",
        dtype=next(iter(factors.values())).A.dtype,
    )


def _adapter_like(new: _Factors, config: LoraConfig) -> LoRA:
    """A LoRA with `new`'s factors, shaped, placed and in the mode of `new.like`."""
    like = new.like
    adapter = LoRA(
        like.in_features,
        like.out_features,
        config.rank,
        config.alpha,
        dropout=config.dropout,
        init="zeros",
        kernel_size=tuple(like.lora_A.shape[2:]),
        embedding=like.embedding,
        device=like.lora_A.device,
        dtype=new.A.dtype,
    )
    with torch.no_grad():
        adapter.lora_A.copy_(new.A)
        adapter.lora_B.copy_(new.B)
    return adapter.train(like.training)
