"""The four functions of `Edifice.Meta.LoRA`, in PyTorch form.

| Edifice (Axon)                          | lorakit (PyTorch)                                 |
|-----------------------------------------|---------------------------------------------------|
| `LoRA.build(input_size:, output_size:)` | `build(input_size=, output_size=)` -> `LoRA`      |
| `LoRA.lora_delta(input, output_size)`   | `lora_delta(input_size, output_size)` -> `LoRA`   |
| `LoRA.wrap(input, original, opts)`      | `wrap(original)`: the layer, adapted in place     |
| `LoRA.output_size(opts)`                | `output_size(layer)` or `output_size(output_size=)`|

An Axon graph node becomes an `nn.Module`: the input node is the module's call argument, so
`wrap` needs no `input`. Defaults are the seed's: rank 8, alpha 16.0, name "lora", and A
drawn from N(0, 0.02) with B = 0 (Edifice's init), so a fresh adapter outputs exact zeros.
Unlike Edifice, `wrap` takes its sizes from the layer and raises for a layer it cannot adapt,
rather than silently computing something that is not LoRA.
"""

from __future__ import annotations

from torch import nn

from .adapter_registry import check_adapter_name
from .config import Init, LoraConfig, check_rank
from .errors import ConfigError
from .layers import LoRA, LoraLayer, lora_class


def lora_delta(
    input_size: int,
    output_size: int,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    name: str = "lora",
    init: Init = "gaussian",
) -> LoRA:
    """The low-rank component (alpha/rank) * B(A(x)): [..., input_size] -> [..., output_size].

    `name` is kept for parity with the seed (its Axon layer prefix); a module needs none.

    Raises:
        ConfigError: a size, rank or alpha is invalid; the message names it.
    """
    check_adapter_name(name)
    return LoRA(input_size, output_size, rank, alpha, init=init)


def build(
    *,
    input_size: int | None = None,
    output_size: int | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    name: str = "lora",
) -> LoRA:
    """A standalone adapter (alpha/rank) * B(A(x)): [..., input_size] -> [..., output_size].

    Raises:
        ConfigError: `input_size` or `output_size` is missing or not a positive int.
    """
    for option, value in (("input_size", input_size), ("output_size", output_size)):
        if value is None:
            raise ConfigError(f"{option} is required, got None")
    return lora_delta(input_size, output_size, rank=rank, alpha=alpha, name=name)


def wrap(
    original: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    name: str = "lora",
    dropout: float = 0.0,
    init: Init = "gaussian",
) -> LoraLayer:
    """Adapt `original` in place: output = original(x) + (alpha/rank) * B(A(x)).

    Sizes come from the layer; its weight is frozen and keeps its name. Returns the same
    object, now a LoRA layer with one adapter called `name`.

    Raises:
        UnsupportedLayerError: `original` is not a Linear, GPT-2 Conv1D, Embedding or ConvNd.
        AdapterError: the layer already has an adapter called `name`.
    """
    check_adapter_name(name)
    # Validate everything before the layer changes class, so a bad option leaves it untouched.
    config = LoraConfig(rank=rank, alpha=alpha, dropout=dropout, init=init, targets=(name,))
    cls = lora_class(original)
    layer = original if isinstance(original, LoraLayer) else cls.adapt(original)
    layer.weight.requires_grad_(False)
    if getattr(layer, "bias", None) is not None:
        layer.bias.requires_grad_(False)
    layer.add_adapter(name, config)
    return layer


def output_size(layer: nn.Module | None = None, *, output_size: int | None = None) -> int:
    """The output size of a LoRA layer: from the layer itself, or from the options.

    Raises:
        ConfigError: neither a layer nor `output_size` is given, or the size is invalid.
    """
    if layer is not None:
        if isinstance(layer, LoRA):
            return layer.out_features
        if isinstance(layer, LoraLayer):
            return layer.lora_dims()[1]
        raise ConfigError(f"layer must be a LoRA module or LoRA layer, got {type(layer).__name__}")
    if output_size is None:
        raise ConfigError("output_size is required when no layer is given, got None")
    return check_rank(output_size, "output_size")
