"""Save an adapter in Hugging Face PEFT's format, atomically, one save of a folder at a time.

folder/adapter_config.json           PEFT's keys only
folder/adapter_model.safetensors     PEFT's tensor keys; lorakit's extras in the header metadata
folder/<name>/...                    an adapter not named "default" (PEFT's layout)
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path

from torch import Tensor, nn

from .._version import __version__
from ..adapter_registry import adapter_configs, check_adapter_name
from ..config import LoraConfig
from ..errors import AdapterError
from ..layers import LoraLayer
from ..layers.parameter import ParamLoraLayer
from ..layers.trainable_tokens import TrainableTokensMixin
from ..token_targets import find_token_targets
from ..tree import base_modules
from .atomic import atomic_write
from .base_model import BaseModelInfo, describe_base, id2label_metadata
from .files import DEFAULT, adapter_folder, canonical
from .io import CONFIG_NAME, WEIGHTS_NAME, folder_lock, safetensors_bytes
from .original_base import original_base_config, original_base_factor
from .peft_format import to_peft
from .plan import Modules, Slot, base_shapes, peft_targets, plan
from .validate import META_CONFIG, META_FINGERPRINT, META_SHAPES, META_VERSION, fingerprint


def save_adapter(
    model: nn.Module,
    path: str | PathLike,
    adapter_name: str = DEFAULT,
    *,
    base_model: str | PathLike | None = None,
    for_original_base: bool = False,
) -> Path:
    """Write adapter `adapter_name` of `model` in PEFT's format; returns the adapter's folder.

    "default" goes to `path`, any other name to `path/<name>` (as PEFT's save_pretrained).
    The adapter records what it needs to be used (see `base_model.py`): `base_model` as the
    base's name (default: the model config's `_name_or_path`), PEFT's task_type, and a
    classifier's label names.
    Each file is written to a temporary file beside it, fsynced and renamed into place, the
    weights first; the weights' header also carries the config, so an interrupted save leaves
    the previous adapter (or the new one) loadable, never a mix. Saves (and lorakit's reads)
    of one folder hold a lock on it, so two processes saving at once leave one whole adapter.

    A PiSSA / OLoRA adapter (whose init moved s B0 A0 out of the base) is saved as it is,
    with its init in the config: lorakit and PEFT replay the init when they load it onto the
    original base. With `for_original_base=True` it is saved instead as a plain LoRA of rank
    2r, [A; A0] and [B, -B0], for the original base (PEFT's
    `path_initial_model_for_weight_conversion`; see `checkpoint.original_base`).

    Raises:
        AdapterError: `adapter_name` is not a plain identifier or not on the model, or
            `for_original_base` for an adapter whose init left the base as it was.
    """
    check_adapter_name(adapter_name)
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterError(f"unknown adapter {adapter_name!r}; the model has {list(configs)}")
    config = configs[adapter_name]
    if for_original_base:
        config = original_base_config(config, adapter_name)
    modules = list(base_modules(model))  # the one walk: targets, plan and PEFT's targets
    targets = [
        (p, m) for p, m in modules if isinstance(m, LoraLayer) and adapter_name in m.lora
        and not isinstance(m, TrainableTokensMixin)  # rows, not LoRA: `tokens`
    ]  # fmt: skip
    slots = plan(config, modules, targets, find_token_targets(model, config, targets))
    tensors = {
        key: _tensor(model, slot, adapter_name, for_original_base)
        for key, slot in slots.items()
        if not slot.optional
    }
    base = describe_base(model, base_model, config.modules_to_save)
    peft_config = _peft_config(config, modules, targets, base)
    shapes = base_shapes(targets)
    metadata = {
        META_VERSION: __version__,
        META_FINGERPRINT: fingerprint(shapes),
        META_SHAPES: json.dumps(shapes, sort_keys=True),
        META_CONFIG: canonical(peft_config),
        **id2label_metadata(base),
    }
    folder = adapter_folder(path, adapter_name)
    write_files(folder, tensors, metadata, peft_config)
    return folder


def _tensor(model: nn.Module, slot: Slot, adapter_name: str, for_original_base: bool) -> Tensor:
    module = model.get_submodule(slot.module)
    if slot.kind == "tensor":
        return getattr(module, slot.name)
    adapter = module.lora[adapter_name]
    if for_original_base and slot.kind in ("lora_A", "lora_B"):
        tensor = original_base_factor(adapter, slot.kind, slot.module)
    else:
        tensor = getattr(adapter, slot.kind)
    assert tuple(tensor.shape) == slot.shape, (slot, tensor.shape)  # plan and layer agree
    return tensor


def _peft_config(
    config: LoraConfig, modules: Modules, targets: Modules, base: BaseModelInfo
) -> dict[str, object]:
    """The adapter_config.json of the adapter `config` on `targets`, for the base `base`."""
    # GPT-2 Conv1D layers store W as (in, out); by the class flag, so transformers stays optional.
    fan_in_fan_out = any(getattr(layer, "weight_transposed", False) for _, layer in targets)
    layers = [p for p, m in targets if not isinstance(m, ParamLoraLayer)]
    target_modules = peft_targets(config, modules, layers)
    peft_config = to_peft(config, target_modules, fan_in_fan_out, base.name_or_path)
    peft_config["task_type"] = base.task_type
    return peft_config


def write_files(
    folder: Path, tensors: dict[str, Tensor], metadata: dict[str, str], peft_config: dict
) -> None:
    """Write the weights (with `metadata` in their header) and adapter_config.json to
    `folder`, weights first, each atomically, under the folder's lock."""
    weights_bytes = safetensors_bytes(tensors, metadata)
    config_bytes = (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()
    config_path = folder / CONFIG_NAME
    folder.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder):  # another save of this folder waits: the pair stays one save's
        atomic_write(folder / WEIGHTS_NAME, weights_bytes)
        # An unchanged config is not rewritten: then the weights' rename alone is the save.
        if not config_path.is_file() or config_path.read_bytes() != config_bytes:
            atomic_write(config_path, config_bytes)
