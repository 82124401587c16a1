"""Read and load adapters saved in Hugging Face PEFT's format; everything is checked before
the model changes."""

from __future__ import annotations

from dataclasses import replace
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch
from torch import Tensor, nn

from ..adapter_registry import adapter_configs, check_adapter_name
from ..config import LoraConfig
from ..errors import AdapterError, CheckpointError, ConfigError, TargetNotFoundError
from ..inject import inject_found
from ..targets import find_targets, without_missing_saved
from ..token_targets import TokenTarget, find_token_targets
from ..tree import base_modules
from .files import DEFAULT, open_adapter
from .io import CONFIG_NAME
from .peft_format import from_peft, with_prefix, wrapper_copies
from .plan import Modules, Slot, factor_dtype, plan
from .validate import check_base, check_finite, check_tensors

if TYPE_CHECKING:
    from typing_extensions import Unpack


class LoadOptions(TypedDict, total=False):
    """The keyword options of `load_adapter` (documented there), which `from_pretrained` takes
    too; a test checks the two lists agree."""

    allow_pickle: bool
    allow_nonfinite: bool
    dtype: torch.dtype | str | None


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
        targets = _targets(model, config, files.folder)  # found once: inject_found takes them
        tokens = _token_targets(model, config, targets, files.folder)
        slots = plan(config, list(base_modules(model)), targets, tokens)
        names = {with_prefix(k): k for k in files.entries}  # keys are unique with the prefix
        for copy in wrapper_copies(set(names), config):
            del names[copy]
        check_tensors(slots, {k: files.entries[n] for k, n in names.items()}, files.folder)
        wanted = [key for key in slots if key in names]
        read = files.read([names[key] for key in wanted])  # nothing else is read
    tensors = {key: read[names[key]] for key in wanted}
    if not allow_nonfinite:
        check_finite(tensors, files.weights)
    config = replace(config, dtype=dtype or factor_dtype(slots, tensors))
    inject_found(model, config, targets, adapter_name)
    _fill(model, {key: slots[key] for key in wanted}, tensors, adapter_name)
    return model


def _targets(model: nn.Module, config: LoraConfig, folder: Path) -> Modules:
    try:
        return find_targets(model, config)
    except TargetNotFoundError as err:
        raise CheckpointError(f"{folder}: the adapter does not fit this model: {err}") from None


def _token_targets(
    model: nn.Module, config: LoraConfig, targets: Modules, folder: Path
) -> list[TokenTarget]:
    try:
        return find_token_targets(model, config, targets)
    except (ConfigError, TargetNotFoundError) as err:
        raise CheckpointError(f"{folder}: the adapter does not fit this model: {err}") from None


def _fill(
    model: nn.Module, slots: dict[str, Slot], tensors: dict[str, Tensor], adapter_name: str
) -> None:
    """Copy each file tensor into its slot: the new adapter's factors, or a module's tensor."""
    with torch.no_grad():
        for key, slot in slots.items():
            module = model.get_submodule(slot.module)
            owner = module.lora[adapter_name] if slot.kind != "tensor" else module
            getattr(owner, slot.name).copy_(tensors[key])


def from_pretrained(
    base_model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    **options: Unpack[LoadOptions],
) -> nn.Module:
    """Read the adapter config at `path`, inject it into `base_model` and load its tensors.

    PEFT's `PeftModel.from_pretrained(base, path)`, for lorakit; returns `base_model`. The
    options are `load_adapter`'s (`allow_pickle`, `allow_nonfinite`, `dtype`).
    """
    return load_adapter(base_model, path, adapter_name, **options)
