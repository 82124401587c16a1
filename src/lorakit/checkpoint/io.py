"""Adapter files on disk: the folder lock, and reads that turn any damage into CheckpointError.

Nothing here unpickles unless asked: safetensors is read by default, and PEFT's legacy
`adapter_model.bin` only with `allow_pickle=True`, through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from ..errors import CheckpointError
from .safe_json import parse_json
from .safetensors_file import SafetensorsFile

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; the weights' config copy guards
    fcntl = None

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


@contextmanager
def folder_lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold flock on the adapter folder itself: exclusive while a save writes its pair of
    files, shared while a read takes its pair, so a reader never sees one writer's config
    with another's weights. Locking the folder leaves no lock file in a user's folder.
    Where flock is unavailable the read still guards itself: the weights carry their config.
    """
    fd = None
    try:
        fd = os.open(folder, os.O_RDONLY)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    except OSError:  # no directory fds or no flock (some network file systems)
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last fd releases the lock


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise `tensors` (made contiguous, on CPU) with header metadata {"format": "pt", ...}."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"format": "pt", **metadata})


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; an adapter folder needs {CONFIG_NAME}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    value = parse_json(text, str(path))
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; any damage is a CheckpointError naming it.

    The header is checked whole before any tensor is read (see `SafetensorsFile`)."""
    with SafetensorsFile(path) as st:
        return st.read(list(st.entries)), st.metadata


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
