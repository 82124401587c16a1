"""What a model's adapters amount to: the injection report, parameter counts, the summary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .table import table_lines
from .tree import lora_layers


@dataclass(frozen=True)
class InjectionReport:
    """What `inject` did: the adapter, the module paths adapted, and parameter counts."""

    adapter_name: str
    adapted: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"adapter {self.adapter_name!r}: {len(self.adapted)} layers adapted || "
            + format_counts(self.trainable, self.total)
        )


def format_counts(trainable: int, total: int) -> str:
    """PEFT's familiar line: trainable params, all params and their ratio."""
    share = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters count once, and a bitsandbytes
    4-bit weight as the weights it holds, not its packed bytes (as PEFT counts)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(_weights_held(p) for p in params)
    return sum(p.numel() for p in params if p.requires_grad), total


def _weights_held(p: nn.Parameter) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return shape.numel() if isinstance(shape, torch.Size) else p.numel()


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's familiar line: trainable params || all params || trainable%."""
    print(format_counts(*trainable_parameters(model)))


def summary(model: nn.Module) -> str:
    """A table of adapted layers: path, adapter, rank, alpha, scale, and the counts line."""
    rows = [("module", "adapter", "rank", "alpha", "scaling", "merged")]
    for name, layer in lora_layers(model):
        for adapter_name, a in layer.lora.items():
            merged = "yes" if adapter_name in layer.lora_merged else "no"
            if hasattr(a, "token_indices"):  # trainable tokens: rows, no rank or scale
                tokens = f"{len(a.token_indices)} tokens"
                rows.append((name, adapter_name, tokens, "-", "-", merged))
                continue
            rows.append((name, adapter_name, str(a.rank), f"{a.alpha:g}", f"{a.scaling:g}", merged))
    return "\n".join([*table_lines(rows), format_counts(*trainable_parameters(model))])
