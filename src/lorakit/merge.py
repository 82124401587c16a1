"""Merge, unmerge, unload: explicit calls over the pure math in `functional`.

Merged, a layer computes (W + s B A) x: exactly the base's cost, and the same outputs as the
unmerged adapter up to float rounding.

Exact unmerge: float addition cannot be undone by subtraction ((W + d) - d != W in general,
and with two adapters the error grows with every merge/unmerge cycle). So `merge` keeps a copy
of each adapted weight from before its first merge (memory: one extra weight per merged layer,
freed by `unmerge`), and `unmerge` writes that copy back (plus any adapters still merged) bit
for bit, after checking the weight was not changed while merged. `merge(model,
keep_original=False)` saves the memory; `unmerge` then subtracts, and each merge/unmerge cycle
moves an element by at most about eps * (|W| + sum_a |s_a B_a A_a|) per merged adapter, eps
the machine epsilon of the weight's dtype (2**-23 for float32, 2**-7 for bfloat16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .errors import AdapterError, MergeError
from .layers import LoraLayer
from .layers.trainable_tokens import TrainableTokensMixin
from .tree import lora_layers


def merge(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Fold the active adapters into the base weights, in place; merging twice is a no-op.

    With `keep_original` (the default) each layer keeps a copy of its unmerged weight until
    `unmerge`, which then restores the weight bit for bit; without it, `unmerge` subtracts and
    rounds (see the module docstring for the bound).

    Raises:
        MergeError: an adapter holds NaN or inf (checked on every layer before any write), an
            adapted weight is tied to another module, which merging would change too, or an
            adapted layer is quantized (bitsandbytes 4-bit / 8-bit: rounding the merged
            weight back to its codes would lose the adapter; `merge_and_unload` dequantizes),
            a conv with groups > 1, or an adapter with lora_bias on a layer without a bias.
        AdapterError: called inside `disabled(model)`.
    """
    layers = _check_adapters(model)
    _check_untied(model)
    _check_refusals(layers)
    for _, layer in layers:
        layer.merge(keep_original=keep_original)
    return model


def _check_adapters(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The model's LoRA layers, once no `disabled` block is open and no active adapter holds
    NaN or inf (a merge would write them into the base)."""
    layers = list(lora_layers(model))
    if any(layer.lora_disabled for _, layer in layers):
        raise AdapterError("cannot merge inside lorakit.disabled(model); merge after the block")
    for name, layer in layers:
        for adapter_name in layer.lora_active:
            for p in layer.lora[adapter_name].parameters():
                if not p.is_meta and not torch.isfinite(p).all():
                    raise MergeError(
                        f"adapter {adapter_name!r} of layer {name!r} holds NaN or inf; "
                        "nothing was merged"
                    )
    return layers


def _check_refusals(layers: list[tuple[str, LoraLayer]], requantized: bool = False) -> None:
    """Refuse before any write when a layer cannot take its active adapters: quantized (unless
    `requantized`: those are rounded back into codes), a grouped conv, a lora_bias without a
    base bias (see each layer's `merge_refusal`; `LoraLayer`'s for requantized layers)."""
    for name, layer in layers:
        refuse = layer.merge_refusal
        if requantized and getattr(layer, "is_quantized", False):
            refuse = partial(LoraLayer.merge_refusal, layer)  # codes are fine; a lora_bias
        todo = [n for n in layer.lora_active if n not in layer.lora_merged]
        refusals = [r for r in map(refuse, todo) if r is not None]
        if refusals:
            raise MergeError(f"layer {name!r}: {refusals[0]}; nothing was merged")


def _check_untied(model: nn.Module) -> None:
    """Refuse to merge into a weight that another module also uses (e.g. a tied lm_head)."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            users.setdefault(id(weight), []).append((name, module))
    for name, layer in lora_layers(model):
        owner = getattr(layer, "lora_holder", layer)  # an adapted raw parameter's module
        shared = [n for n, m in users.get(id(layer.weight), []) if m not in (layer, owner)
                  and not _both_tokens(layer, m)]  # fmt: skip
        if layer.lora_active and shared:
            raise MergeError(
                f"the weight of {name!r} is tied to {shared}; merging would change those "
                "modules too. Keep the adapter unmerged, or untie the weights first"
            )


def _both_tokens(layer: nn.Module, other: nn.Module) -> bool:
    """Trainable-token layers on one tied weight write the same rows: merging is meant to
    change both (PEFT's tied output layer)."""
    return isinstance(layer, TrainableTokensMixin) and isinstance(other, TrainableTokensMixin)


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of the base weights again, in place.

    Bit for bit where `merge` kept the original weight and the weight is unchanged since.
    """
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; layers get their original classes back."""
    for _, layer in list(lora_layers(model)):
        layer.unmerge()
        layer.restore()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters, then remove all adapters: a plain model of original classes.

    A quantized layer (bitsandbytes Linear4bit / Linear8bitLt) becomes a full-precision
    `nn.Linear`: its weight dequantized, then the adapters added (never rounded back into
    4-bit or 8-bit codes). Raises as `merge`.
    """
    _check_adapters(model)
    # the model is one quantized layer (a transformers model loaded quantized has an
    # `is_quantized` attribute too: not a layer)
    if isinstance(model, LoraLayer) and getattr(model, "is_quantized", False):
        return model.merged_linear()
    _unload_quantized(model)
    merge(model, keep_original=False)  # nothing is unmerged after this: no copy needed
    for _, layer in list(lora_layers(model)):
        layer.restore()
    return model


def merge_and_requantize(model: nn.Module) -> dict[str, float]:
    """Merge the active adapters and remove all adapters, keeping quantized layers quantized:
    each bitsandbytes Linear4bit / Linear8bitLt gets dequant(W) + s B A re-quantized into its
    codes (same settings), the other layers merge as `merge_and_unload`. In place.

    Opt-in, because rounding changes the model: returns {layer path: rounding error} for the
    quantized layers, the share of the adapter's delta lost, ||Q(W + D) - (W + D)|| / ||D||.
    With a delta below one quantization step (typical after finetuning) that is 1 or more:
    the adapter is lost and the rounding adds as much noise again (see
    `tests/test_qlora_requantize.py`); `merge_and_unload` (full precision) keeps it all.

    Raises:
        MergeError: as `merge` (non-finite adapter, tied weight, a grouped conv, a lora_bias
            without a base bias), before anything changes.
    """
    _check_refusals(_check_adapters(model), requantized=True)
    _check_untied(model)
    quantized = [(n, m) for n, m in lora_layers(model) if getattr(m, "is_quantized", False)]
    errors = {name: layer.requantize_merged() for name, layer in quantized}
    merge(model, keep_original=False)
    for _, layer in list(lora_layers(model)):
        layer.restore()
    return errors


def _unload_quantized(model: nn.Module) -> None:
    """Replace each quantized LoRA layer by its merged full-precision Linear, at every path
    that holds it."""
    quantized = {id(m): m for _, m in lora_layers(model) if getattr(m, "is_quantized", False)}
    if not quantized:
        return
    merged = {key: layer.merged_linear() for key, layer in quantized.items()}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in merged:
                setattr(parent, child_name, merged[id(child)])


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base outputs; the previous state comes back after.

    Merged adapters are taken out on entry (exactly, see `unmerge`) and merged again on exit.
    """
    layers = [layer for _, layer in lora_layers(model)]
    before = [(layer.lora_disabled, layer.lora_merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.lora_disabled = True
        yield model
    finally:
        for layer, (was_disabled, merged) in zip(layers, before):
            layer.lora_disabled = was_disabled
            layer.merge(merged)
