"""An adapter folder opened for reading: its config, header metadata and tensor entries taken
together under the folder's shared lock, checked before any tensor is read.

    with open_adapter(path) as files:
        files.config, files.metadata, files.entries   # checked, no tensor read yet
        files.read(keys)                               # only the tensors asked for
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

from torch import Tensor

from ..errors import CheckpointError
from .base_model import saved_labels
from .io import CONFIG_NAME, WEIGHTS_NAME, find_weights, folder_lock, read_json, read_pickle
from .safetensors_file import SafetensorsFile
from .validate import TensorInfo, check_unique, saved_config, saved_shapes

DEFAULT = "default"


def adapter_folder(path: str | PathLike, adapter_name: str = DEFAULT) -> Path:
    """Where PEFT keeps adapter `adapter_name` of a save at `path`: the folder itself for
    "default", else the subfolder named after the adapter."""
    path = Path(path)
    return path if adapter_name == DEFAULT else path / adapter_name


def canonical(config: dict) -> str:
    """The config as lorakit stores it in the weights' header (sorted keys)."""
    return json.dumps(config, sort_keys=True)


@dataclass
class AdapterFiles:
    """A checked adapter folder: `entries` are the header's (key -> dtype, shape) or, for a
    legacy pickle, the tensors themselves."""

    folder: Path
    weights: Path
    config: dict
    metadata: dict[str, str]
    entries: dict[str, TensorInfo]
    _file: SafetensorsFile | None = field(default=None, repr=False)

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors `keys`, read from the file opened with the header (never a newer one)."""
        if self._file is None:
            return {k: self.entries[k] for k in keys}  # a pickle: read whole already
        return self._file.read(keys)


def _resolve(path: str | PathLike, adapter_name: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"adapter folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder holding {CONFIG_NAME}")
    sub = adapter_folder(path, adapter_name)
    if (sub / CONFIG_NAME).is_file():
        return sub
    if (path / CONFIG_NAME).is_file():
        return path
    inside = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
    hint = f"; adapters in subfolders: {inside}" if inside else ""
    raise CheckpointError(f"{path} holds no {CONFIG_NAME}{hint}")


@contextmanager
def open_adapter(
    path: str | PathLike, adapter_name: str = DEFAULT, *, allow_pickle: bool = False
) -> Iterator[AdapterFiles]:
    """The checked AdapterFiles of the adapter at `path` (see the module docstring).

    Raises:
        CheckpointError: missing folder or files, malformed JSON or header (the message names
            the file and the field), a key twice, or a pickle without `allow_pickle=True`.
    """
    folder = _resolve(path, adapter_name)
    with folder_lock(folder, shared=True):  # config and weights of one save, not two
        raw = read_json(folder / CONFIG_NAME)
        weights = find_weights(folder, allow_pickle)
        st = SafetensorsFile(weights) if weights.name == WEIGHTS_NAME else None
    try:
        if st is None:
            entries, metadata = read_pickle(weights), {}
        else:
            entries, metadata = dict(st.entries), st.metadata
        check_unique(entries, weights)
        saved_shapes(metadata, weights)  # well formed, whether or not a model checks it
        saved_labels(metadata, weights)
        saved = saved_config(metadata, weights)
        if saved is not None and canonical(saved) != canonical(raw):
            warnings.warn(
                f"{folder / CONFIG_NAME} differs from the config stored with {weights.name} "
                "(an interrupted save?); using the one stored with the weights",
                UserWarning,
                stacklevel=4,
            )
            raw = saved
        yield AdapterFiles(folder, weights, raw, metadata, entries, st)
    finally:
        if st is not None:
            st.close()
