"""Adapter files on disk: atomic writes, and reads that turn any damage into CheckpointError.

Nothing here unpickles unless asked: safetensors is read by default, and PEFT's legacy
`adapter_model.bin` only with `allow_pickle=True`, through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ..errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over `path`
    (rename is atomic within one file system); the folder is fsynced so the rename survives
    a crash. An interrupted write leaves at most a stray `.tmp` file, never a damaged `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(f, data: bytes) -> None:  # noqa: ANN001 - a binary file object
    """The one place bytes hit a file (a seam the interrupted-save tests slow down)."""
    f.write(data)


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise `tensors` (made contiguous, on CPU) with header metadata {"format": "pt", ...}."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"format": "pt", **metadata})


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; an adapter folder needs {CONFIG_NAME}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """({key: {"dtype", "shape", ...}}, metadata) of a safetensors file, without its tensors.

    Raises:
        CheckpointError: the file is missing, truncated or its header is not safetensors.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        metadata = header.pop("__metadata__", None) or {}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensors need {8 + n + end} bytes, the file has {size}")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    return header, metadata


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any damage is a CheckpointError naming it."""
    _, metadata = read_header(path)
    try:
        tensors = st_load(path.read_bytes())
    except Exception as err:  # safetensors raises its own error types for damaged bytes
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    return tensors, metadata


def read_pickle(path: Path) -> dict[str, Tensor]:
    """PEFT's legacy .bin, through torch.load(weights_only=True): tensors only, no code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged zip, a pickle needing code, ...: all refused
        raise CheckpointError(f"{path} is not a readable weights-only torch file: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} must hold a dict of tensors")
    return state


def find_weights(folder: Path, allow_pickle: bool) -> Path:
    """The weights file of an adapter folder: safetensors, or .bin when pickles are allowed."""
    st, pkl = folder / WEIGHTS_NAME, folder / PICKLE_NAME
    if st.is_file():
        return st
    if pkl.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pkl} is a pickle file, which can run code when read; lorakit reads only "
                f"{WEIGHTS_NAME} unless you pass allow_pickle=True "
                "(then through torch.load(weights_only=True))"
            )
        return pkl
    raise CheckpointError(f"{folder} holds no {WEIGHTS_NAME}")
