"""Training precision: float32 throughout, or a bf16 base under autocast (`--precision`).

bf16: the base model is loaded in bfloat16 (half the memory of its frozen weights, which need
no float32 master copy), every forward runs under `torch.autocast(dtype=bfloat16)`, and what
trains keeps float32: the adapters (`LoraConfig.dtype`, float32 unless `--dtype` says
otherwise) and `modules_to_save` (upcast after injection), so AdamW updates are not rounded
to 8 bits of mantissa. float16 is not offered: it needs loss scaling (a GradScaler whose
state a resumed run must restore), and bf16 covers the same hardware need.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]


def load_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype to load the base model in; None keeps the checkpoint's own."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The context every forward runs in: autocast to bf16, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def upcast(modules: list[nn.Module]) -> None:
    """Fully trained modules (`modules_to_save`) to float32, in place."""
    for module in modules:
        module.float()
