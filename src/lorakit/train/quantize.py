"""QLoRA in `finetune`: a base loaded in 4 or 8 bits, and bitsandbytes' optimizers.

--quantize nf4 | fp4: the base's linear layers as bitsandbytes 4-bit codes, with double
    quantization (QLoRA's: the block scales quantized too), computing in bfloat16 under
    `--precision bf16`, else in float32.
--quantize int8: LLM.int8() rows.
The model is loaded through transformers' `BitsAndBytesConfig`, as users do; the output head
and the classification heads stay unquantized (the latter train in full). As PEFT's
`prepare_model_for_kbit_training` does, the norms and the trained heads are kept in float32,
and the adapters are float32 (LoraConfig's default), so only frozen weights lose precision.

--optim adamw8bit | paged_adamw: bitsandbytes' AdamW with 8-bit state (a quarter of the
state's memory) or with paged state (moved out of GPU memory under pressure; on the CPU an
ordinary AdamW).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ..errors import MissingDependencyError

Quantize = Literal["none", "nf4", "fp4", "int8"]
Optim = Literal["adamw", "adamw8bit", "paged_adamw"]

# Never quantized: the causal-lm output head, and heads trained in full next to the adapter.
UNQUANTIZED = ("lm_head", "classifier", "score")


def require_bitsandbytes(purpose: str) -> None:
    """MissingDependencyError naming the install command when bitsandbytes is missing."""
    try:
        found = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # a finder refused it, or a None entry in sys.modules
        found = False
    if not found:
        raise MissingDependencyError(
            f"{purpose} needs bitsandbytes (not installed); install with: pip install bitsandbytes"
        )


def quantization_config(quantize: Quantize, bf16: bool, keep: Iterable[str] = ()) -> Any:
    """transformers' `BitsAndBytesConfig` for `quantize` (None for "none"); `keep`: more module
    names (suffixes) left unquantized, such as `modules_to_save`."""
    if quantize == "none":
        return None
    require_bitsandbytes(f"--quantize {quantize}")
    from transformers import BitsAndBytesConfig

    skip = list(dict.fromkeys((*UNQUANTIZED, *keep)))
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
        llm_int8_skip_modules=skip,
    )


def prepare_quantized(model: nn.Module) -> None:
    """A quantized model ready to train: norms in float32, and every 4-bit layer (adapted or
    not: the gradient passes through them all) kept in the layout its backward supports
    (`layers.dequantize.keep_trainable_layout`)."""
    from ..layers.dequantize import keep_trainable_layout

    norms_to_float32(model)
    for module in model.modules():
        keep_trainable_layout(module)


def norms_to_float32(model: nn.Module) -> list[str]:
    """Every normalisation layer (LayerNorm, RMSNorm, ...: by class name) to float32, in
    place, as PEFT's `prepare_model_for_kbit_training`; returns their paths."""
    paths = []
    for path, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            module.float()
            paths.append(path)
    return paths


def make_optimizer(groups: list[dict[str, Any]], optim: Optim, lr: float) -> torch.optim.Optimizer:
    """AdamW over parameter `groups` (`lorakit.optim.param_groups`, each with its lr and weight
    decay): torch's, or bitsandbytes' 8-bit-state or paged one."""
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    require_bitsandbytes(f"--optim {optim}")
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if optim == "adamw8bit" else bnb.optim.PagedAdamW
    return cls(groups, lr=lr)
