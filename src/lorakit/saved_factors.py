"""The LoRA factors of a saved adapter folder, read without a model: per layer A, B and scale.

Used where only the files are at hand: `lorakit inspect --spectrum` and `compress_adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from torch import Tensor

from .checkpoint import read_adapter
from .checkpoint.io import CONFIG_NAME
from .checkpoint.peft_format import PREFIX, from_peft
from .config import LoraConfig, scaling
from .errors import CheckpointError

# PEFT's key suffixes of A, and of the B that goes with it
PAIRS = {".lora_A.weight": ".lora_B.weight", ".lora_embedding_A": ".lora_embedding_B"}


@dataclass(frozen=True)
class SavedLayer:
    """One adapted layer of a file: its module path, PEFT's keys of A and B, and its scale."""

    module: str
    key_a: str
    key_b: str
    scale: float


@dataclass(frozen=True)
class SavedAdapter:
    """A saved adapter: its folder, PEFT config (raw and as a LoraConfig), every tensor, the
    header metadata, and its LoRA layers in key order."""

    folder: Path
    raw: dict
    config: LoraConfig
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    layers: list[SavedLayer]

    def factors(self, layer: SavedLayer) -> tuple[Tensor, Tensor]:
        return self.tensors[layer.key_a], self.tensors[layer.key_b]


def read_factors(
    path: str | PathLike, adapter_name: str = "default", *, allow_pickle: bool = False
) -> SavedAdapter:
    """The adapter at `path` (see `lorakit.load_adapter` for `adapter_name`) and its layers.

    Raises:
        CheckpointError: the folder is missing or damaged, or an A factor lacks its B.
    """
    folder, raw, tensors, metadata = read_adapter(path, adapter_name, allow_pickle=allow_pickle)
    config = from_peft(raw, str(folder / CONFIG_NAME))
    layers = []
    for key in sorted(tensors):
        suffix = next((s for s in PAIRS if key.endswith(s)), None)
        if suffix is None:
            continue
        key_b = key.removesuffix(suffix) + PAIRS[suffix]
        if key_b not in tensors:
            raise CheckpointError(f"{folder}: {key!r} has no {key_b!r} to go with it")
        module = key.removeprefix(PREFIX).removesuffix(suffix)
        rank = tensors[key].shape[0]
        alpha = config.for_module(module).alpha
        layers.append(SavedLayer(module, key, key_b, scaling(rank, alpha, config.use_rslora)))
    return SavedAdapter(folder, dict(raw), config, dict(tensors), dict(metadata), layers)
