"""Checks an adapter file must pass before it touches a model: same base, every tensor fits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import Tensor, nn

from ..errors import CheckpointError
from .io import WEIGHTS_NAME
from .plan import Slot

META_VERSION = "lorakit_version"
META_FINGERPRINT = "lorakit_base_fingerprint"
META_SHAPES = "lorakit_base_shapes"
META_CONFIG = "lorakit_config"
_MAX_LISTED = 20


def fingerprint(shapes: dict[str, list[int]]) -> str:
    """A short hash of the adapted layers' paths and weight shapes: same base, same print."""
    text = json.dumps(shapes, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_base(model: nn.Module, metadata: dict[str, str], folder: Path) -> None:
    """Refuse an adapter saved (by lorakit) for a base whose adapted layers differ."""
    if META_SHAPES not in metadata:
        return  # not written by lorakit: the tensor shapes are checked instead
    try:
        shapes = json.loads(metadata[META_SHAPES])
    except json.JSONDecodeError:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: damaged {META_SHAPES} metadata") from None
    problems = []
    for path, shape in shapes.items():
        try:
            weight = model.get_submodule(path).weight
        except AttributeError:
            problems.append(f"{path!r} does not exist here")
            continue
        if list(weight.shape) != shape:
            problems.append(f"{path!r} weight is {tuple(shape)} there, {tuple(weight.shape)} here")
    if problems:
        here = fingerprint(
            {p: list(model.get_submodule(p).weight.shape) for p in shapes if _has(model, p)}
        )
        raise CheckpointError(
            f"{folder} was saved for another base model (fingerprint "
            f"{metadata.get(META_FINGERPRINT)}, this model gives {here}): " + _listing(problems)
        )


def _has(model: nn.Module, path: str) -> bool:
    try:
        return hasattr(model.get_submodule(path), "weight")
    except AttributeError:
        return False


def check_tensors(slots: dict[str, Slot], tensors: dict[str, Tensor], folder: Path) -> None:
    """Every planned tensor present with its shape, nothing else: all problems in one error."""
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
        if k in slots and not t.is_floating_point()
    ]
    if problems:
        raise CheckpointError(
            f"{folder} does not fit this model ({len(problems)} problem(s); nothing was "
            "loaded): " + _listing(problems)
        )


def _listing(problems: list[str]) -> str:
    more = len(problems) - _MAX_LISTED
    return "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
