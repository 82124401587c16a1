"""PEFT's key names for adapted raw parameters (`target_parameters`).

PEFT wraps each adapted parameter's module in a `lora.ParamWrapper`; a second parameter of the
same module wraps the first wrapper, and so on, in the order the module registered its
parameters. A parameter's factors are therefore saved under its module's path with one
`.base_layer` per wrapper around it: for Mixtral's experts (gate_up_proj, then down_proj)

    <experts>.base_layer.lora_A.weight    gate_up_proj (wrapped first, innermost)
    <experts>.lora_A.weight               down_proj (wrapped last, outermost)
"""

from __future__ import annotations

from torch import nn

from ..layers.parameter import ParamLoraLayer, parameter_path


def parameter_prefixes(targets: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """{ParamLoraLayer path: the module path PEFT's keys of that parameter start with}, for
    the parameters among `targets` (those of one adapter)."""
    per_holder: dict[str, list[tuple[int, str]]] = {}
    for path, layer in targets:
        if isinstance(layer, ParamLoraLayer):
            holder_path = parameter_path(path).rpartition(".")[0]
            order = list(layer.lora_holder._parameters).index(layer.param_name)
            per_holder.setdefault(holder_path, []).append((order, path))
    prefixes = {}
    for holder_path, entries in per_holder.items():
        entries.sort()
        for i, (_, path) in enumerate(entries):
            prefixes[path] = holder_path + ".base_layer" * (len(entries) - 1 - i)
    return prefixes
