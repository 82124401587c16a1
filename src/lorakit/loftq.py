"""LoftQ initialisation (Li et al. 2023, PEFT's `init_lora_weights="loftq"`): adapters that
start as the low-rank part of the base's quantization error.

A quantized base computes with Q(W), not W. A fresh adapter (B = 0) leaves that error in
place; LoftQ instead starts with s B A = the best rank-r approximation of W - Q(W) (its SVD), so
Q(W) + s B A starts closer to W. With `iters` > 1 it alternates, as PEFT's `loftq_iter`:

    Q_t = Q(W - s B_{t-1} A_{t-1}),   s B_t A_t = rank-r SVD of (W - Q_t)

and the base is re-quantized to the last Q_t, so base and adapter fit each other. The SVD's
singular values are split evenly between A and B (sqrt on each side, as PEFT), divided by
the scale s so that s B A is the approximation (PEFT leaves s out: exact only for alpha = r).

Two ways in:
- `LoraConfig(init="loftq")` at `inject` on full-precision Linear layers: as PEFT, the base
  weight is replaced by its NF4 round trip (bitsandbytes, block 64, no double quantization)
  and the adapter fitted to the error; quantizing that model to NF4 later gives those codes
  back. Injecting again on such a weight finds no error left, so A = B = 0 (untrainable):
  LoftQ is for the first adapter on a base. As the weight changes in place, a failed `inject`
  does not give the original weight back.
- `loftq_init(model, full_weights)` on a model whose base is already quantized (QLoRA): the
  codes hold no full-precision weight, so it is passed in (the base's state dict).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError, UnsupportedLayerError
from .layers.base import LoraLayer
from .layers.linear import LinearLoraMixin
from .layers.lora import LoRA
from .tree import lora_layers

Roundtrip = Callable[[Tensor], Tensor]  # W -> dequant(quant(W)), float32 (out, in)


@dataclass(frozen=True)
class LoftqFactors:
    """W ~ quantized + scale * B A: the base to compute with, its source, and the factors."""

    quantized: Tensor  # Q(source), float32 (out, in)
    source: Tensor  # what was quantized: W, or W - s B A of the previous step
    lora_A: Tensor  # (rank, in)
    lora_B: Tensor  # (out, rank)


@dataclass(frozen=True)
class LoftqError:
    """A layer's relative weight error ||W - W'|| / ||W|| (Frobenius): W' = Q(W) with a fresh
    adapter (`before`), W' = Q_t + s B A after LoftQ (`after`)."""

    before: float
    after: float


def loftq_factors(
    weight: Tensor, roundtrip: Roundtrip, rank: int, scale: float, iters: int = 1
) -> LoftqFactors:
    """LoftQ's alternating steps on float `weight` (out, in); see the module docstring."""
    _check_iters(iters)
    weight = weight.detach().float()
    source = weight
    for step in range(iters):
        quantized = roundtrip(source)
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = (s[:rank] / scale).sqrt()
        lora_B, lora_A = u[:, :rank] * root, root[:, None] * vh[:rank]
        if step + 1 < iters:
            source = weight - scale * (lora_B @ lora_A)
    return LoftqFactors(quantized, source, lora_A, lora_B)


def _check_iters(iters: object) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ConfigError(f"loftq iters must be a positive integer, got {iters!r}")


def nf4_roundtrip(weight: Tensor) -> Tensor:
    """W -> dequant(NF4(W)) as PEFT's LoftQ quantizes: blocks of 64, no double quantization."""
    from .train.quantize import require_bitsandbytes

    require_bitsandbytes("init='loftq'")
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    codes, state = quantize_4bit(weight.float().contiguous(), blocksize=64, quant_type="nf4")
    return dequantize_4bit(codes, state).float()


def _check_linear(layer: LoraLayer, adapter: LoRA) -> None:
    if not isinstance(layer, LinearLoraMixin) or type(adapter) is not LoRA:
        what = "DoRA" if type(adapter) is not LoRA else type(layer).base_class.__name__
        raise UnsupportedLayerError(
            f"init='loftq' fits a LoRA adapter on a Linear layer's (out, in) weight, not {what}"
        )


def _write(adapter: LoRA, factors: LoftqFactors) -> None:
    with torch.no_grad():
        adapter.lora_A.copy_(factors.lora_A)
        adapter.lora_B.copy_(factors.lora_B)


def init_from_base(layer: LoraLayer, adapter: LoRA) -> None:
    """`init="loftq"` at inject: fit `adapter` to the NF4 error of `layer`'s own float weight
    and replace that weight by its NF4 round trip (PEFT's behaviour; module docstring).

    Raises:
        ConfigError: `layer` is quantized already (its float weight is gone: use `loftq_init`).
        UnsupportedLayerError: not a Linear-shaped layer, or a DoRA adapter.
    """
    if getattr(layer, "is_quantized", False):
        raise ConfigError(
            f"init='loftq' on {type(layer).__name__}: its weight is quantized already and the "
            "full-precision weight LoftQ fits the adapter to is gone. Inject with another init, "
            "then call lorakit.loftq_init(model, full_weights) with the base's float state dict"
        )
    _check_linear(layer, adapter)
    transposed = layer.weight_transposed
    weight = layer.weight.T if transposed else layer.weight
    factors = loftq_factors(weight, nf4_roundtrip, adapter.rank, adapter.scaling)
    _write(adapter, factors)
    with torch.no_grad():
        q = factors.quantized.T if transposed else factors.quantized
        layer.weight.copy_(q)


def loftq_init(
    model: nn.Module,
    full_weights: Mapping[str, Tensor],
    adapter_name: str = "default",
    iters: int = 1,
) -> dict[str, LoftqError]:
    """LoftQ for adapter `adapter_name` on every quantized (bitsandbytes) LoRA layer of
    `model`, in place: A and B fitted to W - Q(W), and the layer's codes re-quantized (with
    its own settings) to the Q the factors were fitted to. Layers not quantized are left as
    they are (no quantization error to fit).

    Args:
        full_weights: the full-precision base's state dict, {"<layer path>.weight": W},
            e.g. `safetensors.torch.load_file("base/model.safetensors")`.
        iters: alternating steps (PEFT's `loftq_iter`); 1 fits the adapter to the layer's
            own codes.

    Returns:
        {layer path: LoftqError}: the weight error before (fresh adapter) and after.

    Raises:
        ConfigError: a quantized layer's weight is missing from `full_weights` or has another
            shape, or `iters` is not a positive integer. Nothing is changed then.
        UnsupportedLayerError: `adapter_name` is a DoRA adapter.
    """
    _check_iters(iters)
    todo = _quantized_layers(model, full_weights, adapter_name)
    return {n: _loftq_layer(layer, layer.lora[adapter_name], w, iters) for n, layer, w in todo}


def _quantized_layers(
    model: nn.Module, full_weights: Mapping[str, Tensor], adapter_name: str
) -> list[tuple[str, LoraLayer, Tensor]]:
    """(path, layer, W) of each quantized LoRA layer holding `adapter_name`, W checked."""
    found = []
    for name, layer in lora_layers(model):
        if not getattr(layer, "is_quantized", False) or adapter_name not in layer.lora:
            continue
        _check_linear(layer, layer.lora[adapter_name])
        key = f"{name}.weight" if name else "weight"
        weight = full_weights.get(key)
        shape = (layer.out_features, layer.in_features)
        if weight is None:
            raise ConfigError(f"loftq_init: full_weights has no {key!r} (the float weight "
                              f"of quantized layer {name!r}); nothing was changed")  # fmt: skip
        if tuple(weight.shape) != shape:
            raise ConfigError(f"loftq_init: full_weights[{key!r}] has shape "
                              f"{tuple(weight.shape)}, layer {name!r} has {shape}; nothing "
                              "was changed")  # fmt: skip
        found.append((name, layer, weight))
    if not found:
        raise ConfigError(f"loftq_init: no quantized layer holds adapter {adapter_name!r}")
    return found


def _loftq_layer(layer: LoraLayer, adapter: LoRA, weight: Tensor, iters: int) -> LoftqError:
    from .layers.dequantize import dequantized_weight
    from .layers.requantize import requantize_, roundtrip

    with torch.no_grad():
        weight = weight.to(device=layer.weight.device, dtype=torch.float32)
        norm = weight.norm()
        before = (weight - dequantized_weight(layer)).norm() / norm
        factors = loftq_factors(weight, lambda w: roundtrip(layer, w), adapter.rank,
                                adapter.scaling, iters)  # fmt: skip
        requantize_(layer, factors.source)
        _write(adapter, factors)
        approx = dequantized_weight(layer) + adapter.delta_weight().float()
        return LoftqError(float(before), float((weight - approx).norm() / norm))
