"""Adapter algebra on saved folders: `compress_adapter`, without loading a model.

The output is a PEFT-format folder like any other: factors of scale 1 (alpha = rank), the
ranks per layer in `rank_pattern` (exact module paths) where they are not the top one, and
every other tensor (modules_to_save, biases) copied as it was.
"""

from __future__ import annotations

import re
from os import PathLike
from pathlib import Path

from torch import Tensor

from .algebra import LayerCompression
from .checkpoint.files import canonical
from .checkpoint.save import write_files
from .checkpoint.validate import META_CONFIG
from .config import check_rank
from .errors import ConfigError
from .saved_factors import SavedAdapter, read_factors
from .spectrum import check_rank_fits, factor_svd, relative_error


def compress_adapter(
    path: str | PathLike,
    rank: int,
    out: str | PathLike,
    *,
    adapter_name: str = "default",
    allow_pickle: bool = False,
) -> list[LayerCompression]:
    """Write to `out` the adapter at `path` with each layer's delta s * B A cut to its top
    `rank` singular values (exact where the delta's rank is <= `rank`); returns per layer the
    ranks and the relative error ||delta - new delta||_F / ||delta||_F.

    Raises:
        ConfigError: `rank` is not positive or above a layer's size, the adapter is DoRA,
            has lora_bias, or sits on a grouped conv.
        CheckpointError: the folder at `path` is missing or damaged.
    """
    check_rank(rank)
    saved = read_factors(path, adapter_name, allow_pickle=allow_pickle)
    if saved.config.use_dora:
        raise ConfigError(
            f"{saved.folder}: use_dora=True; compress works on plain LoRA adapters only"
        )
    if saved.config.lora_bias:  # s * b would change with the new scale
        raise ConfigError(
            f"{saved.folder}: lora_bias=True; compress works on plain LoRA adapters only"
        )
    tensors = dict(saved.tensors)
    report = []
    for layer in saved.layers:
        A, B = saved.factors(layer)
        if B.shape[1] != A.shape[0]:
            raise ConfigError(
                f"{saved.folder}: {layer.module!r} is a grouped conv (lora_B {tuple(B.shape)}); "
                "compress works on ungrouped layers only"
            )
        check_rank_fits(rank, B.shape[0], A[0].numel(), layer.module)
        svd = factor_svd(A, B, layer.scale)
        kept = min(rank, len(svd.S))
        tensors[layer.key_a], tensors[layer.key_b] = svd.factors_like(kept, A, B)
        report.append(LayerCompression(layer.module, A.shape[0], kept, relative_error(svd.S, kept)))
    _write(saved, tensors, {r.module: r.rank for r in report}, Path(out))
    return report


def _write(saved: SavedAdapter, tensors: dict[str, Tensor], ranks: dict[str, int],
           out: Path) -> None:  # fmt: skip
    """`saved`'s config and metadata with the new `ranks` (alpha = rank), and `tensors`."""
    top = max(ranks.values(), default=saved.config.rank)
    pattern = {re.escape(module): r for module, r in ranks.items() if r != top}
    config = {**saved.raw, "r": top, "lora_alpha": top, "use_rslora": False,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern)}  # fmt: skip
    metadata = dict(saved.metadata)
    metadata[META_CONFIG] = canonical(config)
    metadata.pop("format", None)  # safetensors_bytes writes it
    write_files(out, tensors, metadata, config)
