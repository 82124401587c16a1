"""Save and load adapters in Hugging Face PEFT's format, atomically and with checks first.

folder/adapter_config.json           PEFT's keys only
folder/adapter_model.safetensors     PEFT's tensor keys; lorakit's extras in the header metadata
folder/<name>/...                    an adapter not named "default" (PEFT's layout)
"""

from __future__ import annotations

import json
from dataclasses import replace
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapter_registry import adapter_configs, check_adapter_name
from ..config import LoraConfig
from ..errors import AdapterError, CheckpointError, TargetNotFoundError
from ..inject import inject
from ..targets import find_targets, without_missing_saved
from ..tree import lora_layers
from .files import DEFAULT, adapter_folder, canonical, open_adapter
from .io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, folder_lock, safetensors_bytes
from .peft_format import from_peft, to_peft, with_prefix
from .plan import Slot, base_shapes, factor_dtype, peft_targets, plan
from .validate import (
    META_CONFIG,
    META_FINGERPRINT,
    META_SHAPES,
    META_VERSION,
    check_base,
    check_finite,
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


# -- save -----------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | PathLike, adapter_name: str = DEFAULT) -> Path:
    """Write adapter `adapter_name` of `model` in PEFT's format; returns the adapter's folder.

    "default" goes to `path`, any other name to `path/<name>` (as PEFT's save_pretrained).
    Each file is written to a temporary file beside it, fsynced and renamed into place, the
    weights first; the weights' header also carries the config, so an interrupted save leaves
    the previous adapter (or the new one) loadable, never a mix. Saves (and lorakit's reads)
    of one folder hold a lock on it, so two processes saving at once leave one whole adapter.

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
    # GPT-2 Conv1D layers store W as (in, out); by the class flag, so transformers stays optional.
    fan_in_fan_out = any(getattr(layer, "weight_transposed", False) for _, layer in targets)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = to_peft(
        config, peft_targets(model, config, [p for p, _ in targets]), fan_in_fan_out, name_or_path
    )
    shapes = base_shapes(targets)
    metadata = {
        META_VERSION: _version(),
        META_FINGERPRINT: fingerprint(shapes),
        META_SHAPES: json.dumps(shapes, sort_keys=True),
        META_CONFIG: canonical(peft_config),
    }
    folder = adapter_folder(path, adapter_name)
    weights_bytes = safetensors_bytes(tensors, metadata)
    config_bytes = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    config_path = folder / CONFIG_NAME
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):  # another save of this folder waits: the pair stays one save's
        atomic_write(folder / WEIGHTS_NAME, weights_bytes)
        # An unchanged config is not rewritten: then the weights' rename alone is the save.
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
def read_adapter(
    path: str | PathLike, adapter_name: str = DEFAULT, *, allow_pickle: bool = False
) -> tuple[Path, dict, dict[str, Tensor], dict[str, str]]:
    """(folder, PEFT config dict, tensors, header metadata) of a saved adapter; no model needed.

    Raises:
        CheckpointError: missing folder or files, corrupt JSON, damaged safetensors, or a
            pickle file without `allow_pickle=True`; the message names the file.
    """
    with open_adapter(path, adapter_name, allow_pickle=allow_pickle) as files:
        return files.folder, files.config, files.read(list(files.entries)), files.metadata


# -- load -----------------------------------------------------------------------------------
def load_adapter(
    model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    *,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Inject adapter `adapter_name` into `model` from a PEFT-format folder and fill it in.

    Reads `path/<adapter_name>` when it holds an adapter, else `path`. Everything is checked
    before the model changes: the file's header fits the model's layers (missing, unexpected
    and mis-shaped tensors reported together, each by key) before any tensor is read, the base
    model is the one the adapter was saved for, and no tensor holds NaN or inf (unless
    `allow_nonfinite=True`). The LoRA factors keep the file's dtype unless `dtype` is given.
    Like `inject`, the new adapter becomes the one active (and trainable).

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
    with open_adapter(path, adapter_name, allow_pickle=allow_pickle) as files:
        raw = from_peft(files.config, str(files.folder / CONFIG_NAME))
        config = without_missing_saved(model, raw)  # PEFT ignores absent heads
        check_base(model, files.metadata, files.weights)
        slots = plan(model, config, _targets(model, config, files.folder))
        names = {with_prefix(k): k for k in files.entries}  # keys are unique with the prefix
        check_tensors(slots, {k: files.entries[n] for k, n in names.items()}, files.folder)
        wanted = [key for key in slots if key in names]
        read = files.read([names[key] for key in wanted])  # nothing else is read
    tensors = {key: read[names[key]] for key in wanted}
    if not allow_nonfinite:
        check_finite(tensors, files.weights)
    config = replace(config, dtype=dtype or factor_dtype(slots, tensors))
    inject(model, config, adapter_name=adapter_name)
    with torch.no_grad():
        for key in wanted:
            slot = slots[key]
            module = model.get_submodule(slot.module)
            owner = module.lora[adapter_name] if slot.kind != "tensor" else module
            getattr(owner, slot.name).copy_(tensors[key])
    return model


def _targets(model: nn.Module, config: LoraConfig, folder: Path) -> list[tuple[str, nn.Module]]:
    try:
        return find_targets(model, config)
    except TargetNotFoundError as err:
        raise CheckpointError(f"{folder}: the adapter does not fit this model: {err}") from None


def from_pretrained(
    base_model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    *,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Read the adapter config at `path`, inject it into `base_model` and load its tensors.

    PEFT's `PeftModel.from_pretrained(base, path)`, for lorakit; returns `base_model`. The
    options are `load_adapter`'s.
    """
    return load_adapter(
        base_model,
        path,
        adapter_name,
        allow_pickle=allow_pickle,
        allow_nonfinite=allow_nonfinite,
        dtype=dtype,
    )
