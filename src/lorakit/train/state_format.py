"""The files of a checkpoint's training state: tensors in safetensors, the rest in JSON.

No pickle, so reading a checkpoint cannot run code. `state.safetensors` holds every tensor
of the state (trainable parameters, optimizer moments and steps, torch RNG states as uint8
tensors), each under the dotted path of where it sits, e.g. `optimizer.state.3.exp_avg`.
`state.json` holds everything else, with each tensor replaced by a reference to its key:

    {"format": "lorakit-train-state", "version": 1, "state": <encoded state>}

The encoding is exact, so the state read back equals the one written (tuples stay tuples,
int keys stay ints, as the optimizer and `random.setstate` need):

    tensor                   -> {"__tensor__": "<key in state.safetensors>"}
    tuple                    -> {"__tuple__": [...]}
    dict with str keys only  -> a JSON object (unless a key is one of these tags)
    any other dict           -> {"__dict__": [[key, value], ...]} (e.g. int parameter ids)
    list, str, int, float, bool, None -> themselves (NaN and inf as JSON's NaN / Infinity)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.atomic import atomic_write
from ..checkpoint.io import read_safetensors, safetensors_bytes
from ..errors import CheckpointError

JSON_FILE = "state.json"
TENSOR_FILE = "state.safetensors"
FORMAT = "lorakit-train-state"
VERSION = 1
_TAGS = ("__tensor__", "__tuple__", "__dict__")


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write `state` as `folder/state.safetensors` and `folder/state.json` (each fsynced)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors)
    meta = {"lorakit_format": FORMAT, "lorakit_version": str(VERSION)}
    atomic_write(folder / TENSOR_FILE, safetensors_bytes(tensors, meta))
    text = json.dumps({"format": FORMAT, "version": VERSION, "state": encoded})
    atomic_write(folder / JSON_FILE, text.encode("utf-8"))


def read_state(folder: Path) -> dict[str, Any]:
    """The state `write_state` wrote in `folder`.

    Raises:
        CheckpointError: a file is missing, truncated, not ours, or the two do not match;
            the message names the file.
    """
    path = folder / JSON_FILE
    doc = _read_json(path)
    tensors, meta = read_safetensors(folder / TENSOR_FILE)
    if meta.get("lorakit_format") != FORMAT:
        raise CheckpointError(
            f"{folder / TENSOR_FILE} is not a lorakit training state (no "
            f"lorakit_format={FORMAT!r} in its header)"
        )
    used: set[str] = set()
    try:
        state = _decode(doc["state"], tensors, used)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None
    if used != set(tensors):
        extra = sorted(set(tensors) - used)[:3]
        raise CheckpointError(
            f"{folder / TENSOR_FILE} holds tensors {path} does not name ({extra}); "
            "the two files are from different checkpoints"
        )
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'state' must be a JSON object")
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lorakit training state (no format={FORMAT!r})")
    if doc.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has version {doc.get('version')!r}; this lorakit reads version {VERSION}"
        )
    if "state" not in doc:
        raise CheckpointError(f"{path} has no 'state'")
    return doc


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON-able data; its tensors moved into `tensors` under their paths."""
    if isinstance(value, torch.Tensor):
        key = path or "tensor"
        while key in tensors:  # paths join keys with ".": two could meet ("a.b"+"c", "a"+"b.c")
            key += "_"
        tensors[key] = value.detach().to("cpu").clone()  # own storage: safetensors refuses shared
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value):
            return {k: _encode(v, _join(path, k), tensors) for k, v in value.items()}
        pairs = [[_key(k), _encode(v, _join(path, k), tensors)] for k, v in value.items()]
        return {"__dict__": pairs}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value  # json writes NaN / Infinity for non-finite floats and reads them back
    raise CheckpointError(
        f"cannot store {type(value).__name__} at {path or 'the top'} in a checkpoint "
        "(tensors, numbers, strings, None, lists, tuples and dicts only)"
    )


def _key(key: Any) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    raise CheckpointError(f"cannot store dict key {key!r} in a checkpoint (str or int only)")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _decode(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """The inverse of `_encode`; a malformed value raises KeyError / TypeError / ValueError."""
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        ((tag, inner),) = value.items()
        if tag == "__tensor__":
            if not isinstance(inner, str) or inner not in tensors:
                raise KeyError(f"tensor {inner!r} is not in {TENSOR_FILE}")
            used.add(inner)
            return tensors[inner]
        if not isinstance(inner, list):
            raise TypeError(f"{tag} must hold a list, got {type(inner).__name__}")
        if tag == "__tuple__":
            return tuple(_decode(v, tensors, used) for v in inner)
        pairs = [_pair(p) for p in inner]
        return {k: _decode(v, tensors, used) for k, v in pairs}
    return {k: _decode(v, tensors, used) for k, v in value.items()}


def _pair(item: Any) -> tuple[Any, Any]:
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
        raise TypeError(f"__dict__ entries must be [str or int key, value], got {item!r}")
    return item[0], item[1]
