"""Known bugs of the installed `peft` that cross tests must allow for, each detected, not
assumed, so the tests hold before and after PEFT fixes them."""

from __future__ import annotations

import peft
import torch
from torch import nn


class _OneAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2)


def _out_proj_factor() -> int:
    """How many times PEFT adds an MHA out_proj's delta: 2 in PEFT 0.21 (its MHA merge writes
    W + dW into out_proj, then calls out_proj.merge(), which adds dW again through `.data`, in
    every forward too; huggingface/peft#3774 fixes it), 1 once fixed. lorakit adds it once."""
    config = peft.LoraConfig(target_modules=["mha"], init_lora_weights=False)
    model = peft.get_peft_model(_OneAttention(), config)
    out_proj = model.base_model.model.mha.base_layer.out_proj
    with torch.no_grad():
        before = out_proj.base_layer.weight.clone()
        delta = out_proj.get_delta_weight("default")
        model.merge_adapter()
        added = out_proj.base_layer.weight - before
    return round(float((added * delta).sum() / (delta * delta).sum()))


PEFT_OUT_PROJ_FACTOR = _out_proj_factor()


def fix_peft_out_proj(model: nn.Module) -> nn.Module:
    """Divide each MHA out_proj's B in a PEFT model by `PEFT_OUT_PROJ_FACTOR`, so that PEFT
    computes what its file means, W + s B A: the reference lorakit is compared with.

    PEFT's second delta bypasses autograd, so its gradient of such an out_proj's A is then
    lorakit's divided by the factor (B's is lorakit's)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".out_proj.lora_B." in name:
                p.div_(PEFT_OUT_PROJ_FACTOR)
    return model


def peft_merges_conv3d_1x1() -> bool:
    """PEFT 0.21 cannot merge a Conv3d with a 1x1x1 kernel (a shape error; see
    huggingface/peft#3768)."""
    model = peft.get_peft_model(nn.Sequential(nn.Conv3d(5, 10, 1)),
                                peft.LoraConfig(target_modules=["0"], r=2))  # fmt: skip
    try:
        model.merge_adapter()
    except RuntimeError:
        return False
    return True
