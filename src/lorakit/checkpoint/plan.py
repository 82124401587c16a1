"""Which tensors an adapter file holds for a model: PEFT key -> slot (module, tensor, shape).

The same plan drives saving (where each tensor comes from) and loading (what must be in the
file, with which shape), so the two cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ..config import ALL_LINEAR, LoraConfig
from ..layers import lora_class
from ..layers.dora import magnitude_shape
from ..layers.lora import check_groups
from ..layers.mha import out_proj_owners, peft_module_path
from ..layers.parameter import ParamLoraLayer, parameter_path
from ..layers.registry import weight_shape
from ..names import name_matches
from ..token_targets import TokenTarget
from ..tree import base_modules
from .parameter_keys import parameter_prefixes
from .peft_format import lora_bias_key, lora_keys, magnitude_key, param_key, token_key

Kind = Literal["lora_A", "lora_B", "magnitude", "lora_bias", "delta", "tensor"]
Modules = list[tuple[str, nn.Module]]  # (path, module) pairs
# dtypes LoRA factors compute in; a file's other floats (float8) load as float32
COMPUTE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# PEFT may save these layers' base weights (save_embedding_layers, e.g. after a vocab resize)
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class Slot:
    """Where one file tensor lives: `module` path, then `name` ("lora_A", "lora_B",
    "magnitude" (DoRA), "lora_bias" (B's bias), "delta" (trainable token rows), or a
    parameter / buffer of that module), with
    the `shape` it must have; `optional` ones may be absent (base weights PEFT adds for
    embeddings)."""

    kind: Kind
    module: str
    name: str
    shape: tuple[int, ...]
    optional: bool = False


def lora_shapes(module: nn.Module, config: LoraConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A (r, in, *k) and B (out, r / groups, *1) for `module` under its per-module
    `config` (groups > 1 on a grouped conv only).

    Raises:
        ConfigError: the rank is not a multiple of a grouped conv's groups.
    """
    cls = lora_class(module)
    in_features, out_features, kernel = cls.lora_dims(module)  # reads only base attributes
    groups = check_groups(config.rank, cls.lora_groups(module))
    ones = (1,) * len(kernel)
    return (config.rank, in_features, *kernel), (out_features, config.rank // groups, *ones)


def _own_tensors(module: nn.Module, prefix: str) -> Iterable[tuple[str, str, Tensor]]:
    """(owner path, tensor name, tensor) of each parameter and persistent buffer."""
    for path, sub in base_modules(module, prefix):
        for name, p in sub._parameters.items():
            if p is not None:
                yield path, name, p
        for name, b in sub._buffers.items():
            if b is not None and name not in sub._non_persistent_buffers_set:
                yield path, name, b


def plan(
    config: LoraConfig, modules: Modules, targets: Modules, tokens: Iterable[TokenTarget] = ()
) -> dict[str, Slot]:
    """PEFT key -> Slot for an adapter with `config` on the layers `targets` (path, module)
    and the embeddings `tokens` (trainable_token_indices); `modules` is the model's
    `base_modules`, walked once by the caller."""
    slots: dict[str, Slot] = {}
    for target in tokens:  # the rows themselves; a tied lm_head reads them (nothing saved)
        shape = (len(target.token_indices), target.module.weight.shape[1])
        slots[token_key(target.path)] = Slot("delta", target.path, "delta", shape)
    adapted = {path for path, _ in targets}
    owners = out_proj_owners(targets)  # an MHA's out_proj: the MHA's rank, PEFT's key path
    prefixes = parameter_prefixes(targets)
    for path, module in targets:
        if isinstance(module, ParamLoraLayer):  # an adapted raw parameter: factors only
            a_shape, b_shape = module.factor_shapes(config.for_module(parameter_path(path)).rank)
            key_a, key_b = lora_keys(prefixes[path], embedding=False)
            slots[key_a] = Slot("lora_A", path, "lora_A", a_shape)
            slots[key_b] = Slot("lora_B", path, "lora_B", b_shape)
            continue
        a_shape, b_shape = lora_shapes(module, config.for_module(owners.get(path, path)))
        embedding = lora_class(module).is_embedding
        key_a, key_b = lora_keys(peft_module_path(path, owners), embedding)
        slots[key_a] = Slot("lora_A", path, "lora_A", a_shape)
        slots[key_b] = Slot("lora_B", path, "lora_B", b_shape)
        if config.use_dora:  # one magnitude per output row (PEFT's shape)
            m_shape = magnitude_shape(b_shape)
            slots[magnitude_key(path)] = Slot("magnitude", path, "magnitude", m_shape)
        if config.lora_bias and not embedding:  # B's bias (embeddings refuse it at inject)
            slots[lora_bias_key(path)] = Slot("lora_bias", path, "lora_bias", b_shape[:1])
        if isinstance(module, nn.MultiheadAttention):
            continue  # no `weight`; its in-projection is never saved
        # PEFT saves the base weight of an adapted embedding too (save_embedding_layers)
        weight = param_key(path, "weight", adapted=True)
        slots[weight] = Slot("tensor", path, "weight", tuple(module.weight.shape), optional=True)
    if config.bias != "none":
        pool = targets if config.bias == "lora_only" else modules
        for path, module in pool:
            bias = module._parameters.get("bias") if path else None
            if isinstance(bias, nn.Parameter):
                key = param_key(path, "bias", adapted=path in adapted)
                slots[key] = Slot("tensor", path, "bias", tuple(bias.shape))
    for path, module in modules:
        if path.endswith(EMBEDDING_NAMES) and path not in adapted:
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter):
                key = param_key(path, "weight", adapted=False)
                slots[key] = Slot("tensor", path, "weight", tuple(weight.shape), optional=True)
    for path, module in modules:
        if path and name_matches(path, config.modules_to_save):
            for owner, name, t in _own_tensors(module, path):
                key = param_key(owner, name, adapted=False)
                slots[key] = Slot("tensor", owner, name, tuple(t.shape))
    return slots


def peft_targets(config: LoraConfig, modules: Modules, adapted: list[str]) -> str | list[str]:
    """`target_modules` for PEFT: the config's own when PEFT's matching of it picks exactly
    the adapted layers (among `modules`, the model's `base_modules`), else the explicit list
    of adapted paths (what PEFT writes itself for "all-linear")."""
    adapted_set = set(adapted)
    companions = out_proj_owners([(p, m) for p, m in modules if p in adapted_set])
    adapted = [p for p in adapted if p not in companions]  # PEFT adapts them with their MHA
    targets = config.targets
    if targets != ALL_LINEAR and not config.exclude:
        matched = {n for n, _ in modules if n and name_matches(n, targets)}
        if matched == set(adapted):
            return targets if isinstance(targets, str) else list(targets)
    return sorted(adapted)


def base_shapes(targets: list[tuple[str, nn.Module]]) -> dict[str, list[int]]:
    """{path: weight shape} of the adapted layers: the base model's fingerprint material
    (a quantized weight's original shape, so a quantized and a full base agree)."""
    return {parameter_path(path): list(weight_shape(module)) for path, module in targets}


def factor_dtype(slots: Mapping[str, Slot], tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype a loaded adapter's factors get: the file's (the widest, should they differ),
    so float64 stays float64 and bf16 / fp16 keep their memory; float32 for anything else."""
    dtypes = {t.dtype for k, t in tensors.items() if k in slots and slots[k].kind != "tensor"}
    if not dtypes or not dtypes <= COMPUTE_DTYPES:
        return torch.float32
    return functools.reduce(torch.promote_types, dtypes)
