"""The model of a `finetune` run: loaded from its folder (quantized with `--quantize`), LoRA
injected (with the classification head trained in full for seq-cls)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..inject import inject
from ..loftq import loftq_init
from ..overview import InjectionReport
from .finetune_data import FinetuneData
from .finetune_inputs import FinetuneInputs
from .grad_checkpoint import enable_gradient_checkpointing
from .loftq_weights import FolderWeights
from .model import load_model
from .options import TrainOptions
from .precision import load_dtype, upcast
from .quantize import prepare_quantized, quantization_config

# The command line's LoRA defaults: rank 8, alpha 16 on every linear layer (plus the head).
DEFAULT_LORA = LoraConfig(rank=8, alpha=16.0, targets="all-linear")
# Classification heads of transformers models, trained in full next to the adapter.
HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class AdaptedModel:
    """The model with its adapter, the LoRA config used (head included) and what it adapted."""

    model: nn.Module
    lora: LoraConfig
    report: InjectionReport


def prepare_model(
    options: TrainOptions, lora: LoraConfig | None, inputs: FinetuneInputs, data: FinetuneData
) -> AdaptedModel:
    """Load the model and inject `lora` (default `DEFAULT_LORA`), with gradient checkpointing
    if asked; in bf16 the parts trained in full are kept in float32, and with `quantize` the
    norms too (see `train.quantize`)."""
    torch.manual_seed(options.seed)  # the head's and the adapter's initial values
    lora = lora or DEFAULT_LORA
    if lora.init == "loftq" and options.quantize == "none":
        raise ConfigError(
            "init='loftq' fits the adapter to the quantized base's rounding error and needs "
            "--quantize nf4, fp4 or int8"
        )
    quantization = quantization_config(
        options.quantize, options.precision == "bf16", keep=(*HEAD_NAMES, *lora.modules_to_save)
    )
    model = load_model(
        inputs.model_dir,
        inputs.task,
        data.label_map,
        load_dtype(options.precision),
        quantization_config=quantization,
    )
    if quantization is not None:
        prepare_quantized(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = data.pad  # seq-cls heads find the last real token with it
    if inputs.task == "seq-cls" and not lora.modules_to_save:
        lora = _with_head(lora, model)
    report = _inject(model, lora, inputs)
    if options.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if options.precision == "bf16" or quantization is not None:
        upcast([model.get_submodule(path) for path in report.modules_to_save])
    return AdaptedModel(model, lora, report)


def _inject(model: nn.Module, lora: LoraConfig, inputs: FinetuneInputs) -> InjectionReport:
    """`inject`, and with init="loftq" on the quantized base, LoftQ from the float weights in
    the model folder (the quantized layers hold only codes; see `lorakit.loftq`)."""
    if lora.init != "loftq":
        return inject(model, lora)
    report = inject(model, dataclasses.replace(lora, init="kaiming"))
    prefix = getattr(model, "base_model_prefix", "")
    loftq_init(model, FolderWeights(inputs.model_dir, prefix))
    return report


def _with_head(lora: LoraConfig, model: nn.Module) -> LoraConfig:
    """`lora` with the model's classification head added to `modules_to_save`."""
    children = dict(model.named_children())
    heads = tuple(name for name in HEAD_NAMES if name in children)
    return dataclasses.replace(lora, modules_to_save=heads) if heads else lora
