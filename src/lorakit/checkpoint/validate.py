"""Checks an adapter file must pass before it touches a model: lorakit's header metadata is
well formed, each key is there once, the base is the same, every tensor fits and is finite."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..layers.registry import weight_shape
from .peft_format import with_prefix
from .plan import Slot
from .safe_json import parse_json

META_VERSION = "lorakit_version"
META_FINGERPRINT = "lorakit_base_fingerprint"
META_SHAPES = "lorakit_base_shapes"
META_CONFIG = "lorakit_config"
_MAX_LISTED = 20


def fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short hash of the adapted layers' paths and weight shapes: same base, same print."""
    text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TensorInfo(Protocol):
    """What the checks need of a tensor: a Tensor, or a header entry before it is read."""

    shape: tuple[int, ...] | torch.Size
    dtype: torch.dtype


def saved_config(metadata: Mapping[str, str], weights: Path) -> dict | None:
    """The PEFT config lorakit stored with the weights, or None when there is none."""
    if META_CONFIG not in metadata:
        return None
    value = parse_json(metadata[META_CONFIG], f"{weights} metadata {META_CONFIG}")
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{weights} metadata {META_CONFIG} must be a JSON object, got {type(value).__name__}"
        )
    return value


def saved_shapes(metadata: Mapping[str, str], weights: Path) -> dict[str, list[int]] | None:
    """{layer path: weight shape} lorakit stored with the weights, or None when there is none."""
    if META_SHAPES not in metadata:
        return None
    value = parse_json(metadata[META_SHAPES], f"{weights} metadata {META_SHAPES}")
    ok = isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)
        for v in value.values()
    )
    if not ok:
        raise CheckpointError(
            f"{weights} metadata {META_SHAPES} must map layer paths to shapes (lists of "
            f"integers), got {metadata[META_SHAPES][:80]!r}"
        )
    return value


def check_unique(keys: Iterable[str], weights: Path) -> None:
    """Refuse two keys naming one tensor (with and without PEFT's `base_model.model.`)."""
    seen: dict[str, str] = {}
    for key in keys:
        other = seen.setdefault(with_prefix(key), key)
        if other != key:
            raise CheckpointError(f"{weights} holds one tensor twice: {other!r} and {key!r}")


def check_finite(tensors: Mapping[str, Tensor], weights: Path) -> None:
    """Refuse NaN or inf in any tensor, naming them (merging would refuse them much later)."""
    bad = [repr(k) for k, t in tensors.items() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise CheckpointError(
            f"{weights}: NaN or inf in {len(bad)} tensor(s): " + _listing(bad)
            + " (pass allow_nonfinite=True to load them anyway)"
        )


def _finite(tensor: Tensor) -> bool:
    if tensor.dtype.itemsize == 1:  # float8: isfinite lacks kernels for it
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def check_base(model: nn.Module, metadata: Mapping[str, str], weights: Path) -> None:
    """Refuse an adapter saved (by lorakit) for a base whose adapted layers differ."""
    shapes = saved_shapes(metadata, weights)
    if shapes is None:
        return  # not written by lorakit: the tensor shapes are checked instead
    folder = weights.parent
    problems = []
    for path, shape in shapes.items():
        try:
            here = _weight_shape_at(model, path)
        except AttributeError:
            problems.append(f"{path!r} does not exist here")
            continue
        if list(here) != shape:
            problems.append(f"{path!r} weight is {tuple(shape)} there, {here} here")
    if problems:
        here = fingerprint({p: list(_weight_shape_at(model, p)) for p in shapes if _has(model, p)})
        raise CheckpointError(
            f"{folder} was saved for another base model (fingerprint "
            f"{metadata.get(META_FINGERPRINT)}, this model gives {here}): " + _listing(problems)
        )


def _weight_shape_at(model: nn.Module, path: str) -> tuple[int, ...]:
    """The weight shape of the layer at `path`, or of the parameter at `path` (an adapted raw
    parameter, `target_parameters`); AttributeError when neither is there."""
    try:
        return weight_shape(model.get_submodule(path))
    except AttributeError:
        return tuple(model.get_parameter(path).shape)


def _has(model: nn.Module, path: str) -> bool:
    try:
        _weight_shape_at(model, path)
    except AttributeError:
        return False
    return True


def check_tensors(slots: dict[str, Slot], tensors: Mapping[str, TensorInfo], folder: Path) -> None:
    """Every planned tensor present with its shape, nothing else: all problems in one error.

    `tensors` may be the header's entries: then nothing is read before this passes."""
    problems = [
        f"missing {k!r} {s.shape}" for k, s in slots.items() if k not in tensors and not s.optional
    ]
    problems += [f"unexpected {k!r}" for k in tensors if k not in slots]
    problems += [
        f"{k!r} has shape {tuple(t.shape)}, the model needs {slots[k].shape}"
        for k, t in tensors.items()
        if k in slots and tuple(t.shape) != slots[k].shape
    ]
    problems += [
        f"{k!r} has dtype {t.dtype}, not floating point"
        for k, t in tensors.items()
        if k in slots and not t.dtype.is_floating_point
    ]
    if problems:
        raise CheckpointError(
            f"{folder} does not fit this model ({len(problems)} problem(s); nothing was "
            "loaded): " + _listing(problems)
        )


def _listing(problems: list[str]) -> str:
    more = len(problems) - _MAX_LISTED
    return "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
