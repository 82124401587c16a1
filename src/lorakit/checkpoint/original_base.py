"""A PiSSA / OLoRA adapter as a plain LoRA for the original base (PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)`).

PiSSA and OLoRA train on the residual base W - s B0 A0. The trained model is

    W - s B0 A0 + s B A  =  W + s' [B, -B0] [A; A0]      (rank 2r, s' = s)

so A' = [A; A0] (2r, in) and B' = [B, -B0] (out, 2r), with rank 2r and alpha 2 * alpha
(alpha * sqrt(2) with rsLoRA) to keep the scale, apply to the original W, with any other
LoRA, and load in any PEFT-format reader as plain LoRA. A DoRA magnitude stays as it is: the
adapted weight, hence its row norms, is the same. Unlike PEFT, rsLoRA with rank / alpha
patterns is converted too (every alpha scales alike).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import AdapterError
from ..layers.weight_init import moves_base


def original_base_config(config: LoraConfig, adapter_name: str) -> LoraConfig:
    """The plain LoRA config of the converted adapter: ranks doubled, scales kept.

    Raises:
        AdapterError: the adapter's init left the base weights as they were (nothing to
            convert: the adapter already applies to the original base).
    """
    if not moves_base(config.init):
        raise AdapterError(
            f"adapter {adapter_name!r} has init={config.init!r}, which leaves the base weights "
            "as they are: it applies to the original base already; save it without "
            "for_original_base"
        )
    factor = math.sqrt(2.0) if config.use_rslora else 2.0
    return dataclasses.replace(
        config,
        rank=2 * config.rank,
        alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
        init="kaiming",
    )


def original_base_factor(adapter: nn.Module, kind: str, where: str) -> Tensor:
    """A' = [A; A0] or B' = [B, -B0] (`kind` "lora_A" / "lora_B") of one layer's adapter.

    Raises:
        AdapterError: the adapter holds no first factors (its init did not run on this
            layer's weight, e.g. a meta-device model); `where` names the layer.
    """
    if adapter.initial_A is None:
        raise AdapterError(
            f"layer {where!r} holds no initial factors A0, B0 (was the adapter initialised "
            "on a meta-device model?); cannot convert it for the original base"
        )
    if kind == "lora_A":
        return torch.cat([adapter.lora_A.detach(), adapter.initial_A.to(adapter.lora_A)], 0)
    return torch.cat([adapter.lora_B.detach(), -adapter.initial_B.to(adapter.lora_B)], 1)
