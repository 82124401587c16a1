"""Save and load adapters in Hugging Face PEFT's format, atomically and with checks first.

folder/adapter_config.json           PEFT's keys only
folder/adapter_model.safetensors     PEFT's tensor keys; lorakit's extras in the header metadata
folder/<name>/...                    an adapter not named "default" (PEFT's layout)
"""

from __future__ import annotations

import json
import warnings
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import AdapterError, CheckpointError, TargetNotFoundError
from ..inject import (
    adapter_configs,
    check_adapter_name,
    find_targets,
    inject,
    lora_layers,
    without_missing_saved,
)
from ..layers.gpt2 import Conv1DLora
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    find_weights,
    read_json,
    read_pickle,
    read_safetensors,
    safetensors_bytes,
)
from .peft_format import from_peft, to_peft, with_prefix
from .plan import Slot, base_shapes, peft_targets, plan
from .validate import (
    META_CONFIG,
    META_FINGERPRINT,
    META_SHAPES,
    META_VERSION,
    check_base,
    check_tensors,
    fingerprint,
)

__all__ = [
    "adapter_folder",
    "fingerprint",
    "from_pretrained",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]

DEFAULT = "default"


def adapter_folder(path: str | PathLike, adapter_name: str = DEFAULT) -> Path:
    """Where PEFT keeps adapter `adapter_name` of a save at `path`: the folder itself for
    "default", else the subfolder named after the adapter."""
    path = Path(path)
    return path if adapter_name == DEFAULT else path / adapter_name


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True)


# -- save -----------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | PathLike, adapter_name: str = DEFAULT) -> Path:
    """Write adapter `adapter_name` of `model` in PEFT's format; returns the adapter's folder.

    "default" goes to `path`, any other name to `path/<name>` (as PEFT's save_pretrained).
    Each file is written to a temporary file beside it, fsynced and renamed into place, the
    weights first; the weights' header also carries the config, so an interrupted save leaves
    the previous adapter (or the new one) loadable, never a mix.

    Raises:
        AdapterError: `adapter_name` is not a plain identifier or not on the model.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}; the model has {list(configs)}")
    config = configs[adapter_name]
    targets = [(p, layer) for p, layer in lora_layers(model) if adapter_name in layer.lora]
    slots = plan(model, config, targets)
    tensors = {
        key: _tensor(model, slot, adapter_name) for key, slot in slots.items() if not slot.optional
    }
    fan_in_fan_out = any(isinstance(layer, Conv1DLora) for _, layer in targets)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = to_peft(
        config, peft_targets(model, config, [p for p, _ in targets]), fan_in_fan_out, name_or_path
    )
    shapes = base_shapes(targets)
    metadata = {
        META_VERSION: _version(),
        META_FINGERPRINT: fingerprint(shapes),
        META_SHAPES: json.dumps(shapes, sort_keys=True),
        META_CONFIG: _canonical(peft_config),
    }
    folder = adapter_folder(path, adapter_name)
    atomic_write(folder / WEIGHTS_NAME, safetensors_bytes(tensors, metadata))
    config_bytes = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    config_path = folder / CONFIG_NAME
    # An unchanged config is not rewritten: then the weights' rename alone is the whole save.
    if not config_path.is_file() or config_path.read_bytes() != config_bytes:
        atomic_write(config_path, config_bytes)
    return folder


def _tensor(model: nn.Module, slot: Slot, adapter_name: str) -> Tensor:
    module = model.get_submodule(slot.module)
    if slot.kind == "tensor":
        return getattr(module, slot.name)
    tensor = getattr(module.lora[adapter_name], slot.kind)
    assert tuple(tensor.shape) == slot.shape, (slot, tensor.shape)  # plan and layer agree
    return tensor


def _version() -> str:
    from .. import __version__

    return __version__


# -- read -----------------------------------------------------------------------------------
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


def read_adapter(
    path: str | PathLike, adapter_name: str = DEFAULT, *, allow_pickle: bool = False
) -> tuple[Path, dict, dict[str, Tensor], dict[str, str]]:
    """(folder, PEFT config dict, tensors, header metadata) of a saved adapter; no model needed.

    Raises:
        CheckpointError: missing folder or files, corrupt JSON, damaged safetensors, or a
            pickle file without `allow_pickle=True`; the message names the file.
    """
    folder = _resolve(path, adapter_name)
    raw = read_json(folder / CONFIG_NAME)
    weights = find_weights(folder, allow_pickle)
    if weights.name == WEIGHTS_NAME:
        tensors, metadata = read_safetensors(weights)
    else:
        tensors, metadata = read_pickle(weights), {}
    saved = metadata.get(META_CONFIG)
    if saved is not None and saved != _canonical(raw):
        warnings.warn(
            f"{folder / CONFIG_NAME} differs from the config stored with {weights.name} "
            "(an interrupted save?); using the one stored with the weights",
            UserWarning,
            stacklevel=2,
        )
        raw = json.loads(saved)
    return folder, raw, tensors, metadata


# -- load -----------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    *,
    allow_pickle: bool = False,
) -> nn.Module:
    """Inject adapter `adapter_name` into `model` from a PEFT-format folder and fill it in.

    Reads `path/<adapter_name>` when it holds an adapter, else `path`. Everything is checked
    before the model changes: the file fits the model's layers (missing, unexpected and
    mis-shaped tensors reported together, each by key), the base model is the one the adapter
    was saved for. Like `inject`, the new adapter becomes the one active (and trainable).

    Raises:
        AdapterError: `adapter_name` is not a plain identifier or already on the model.
        CheckpointError: the folder or a file is missing or damaged, the config uses a PEFT
            feature lorakit lacks, or the tensors do not fit `model`.
    Warns:
        UserWarning: unknown keys in adapter_config.json.
    """
    check_adapter_name(adapter_name)
    if adapter_name in adapter_configs(model):
        raise AdapterError(f"adapter {adapter_name!r} is already on the model; pick another name")
    folder, raw, tensors, metadata = read_adapter(path, adapter_name, allow_pickle=allow_pickle)
    source = str(folder / CONFIG_NAME)
    config = without_missing_saved(model, from_peft(raw, source))  # PEFT ignores absent heads
    check_base(model, metadata, folder)
    try:
        targets = find_targets(model, config)
    except TargetNotFoundError as err:
        raise CheckpointError(f"{folder}: the adapter does not fit this model: {err}") from None
    slots = plan(model, config, targets)
    tensors = {with_prefix(k): v for k, v in tensors.items()}
    check_tensors(slots, tensors, folder)
    inject(model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for key, slot in slots.items():
            if key not in tensors:
                continue  # an optional tensor the file does not have
            module = model.get_submodule(slot.module)
            owner = module.lora[adapter_name] if slot.kind != "tensor" else module
            getattr(owner, slot.name).copy_(tensors[key])
    return model


def from_pretrained(
    base_model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    *,
    allow_pickle: bool = False,
) -> nn.Module:
    """Read the adapter config at `path`, inject it into `base_model` and load its tensors.

    PEFT's `PeftModel.from_pretrained(base, path)`, for lorakit; returns `base_model`.
    """
    return load_adapter(base_model, path, adapter_name, allow_pickle=allow_pickle)
