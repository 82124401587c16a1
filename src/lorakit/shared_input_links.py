"""Which adapted layers share their LoRA input products: found by `inject`, or named, or off.

`inject` (and `load_adapter`) link the adapted children of one module whose names form one of
the known families of layers that read the same input (`FAMILIES`: q_proj / k_proj / v_proj,
query / key / value, gate_proj / up_proj, ...) and that have the same input width. Names, not
widths alone: o_proj has q_proj's width but reads the attention output, GPT-2's c_proj
c_attn's, and a wrong guess costs its columns in every product (the group checks each call,
so it is never wrong in value), while learning the sets from the first forward would make
that forward round differently from the next ones. Other sets: name them.

The switch is a function rather than a `LoraConfig` option: fusion changes how the products
are computed, not what they are, so it belongs to the model at hand, not to the adapter
files. What it sets is an attribute of each layer (see `lorakit.shared_inputs`), so copies,
pickles and wrappers of the model keep it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from torch import nn

from .errors import ConfigError, TargetNotFoundError
from .layers.linear import LinearLoraMixin
from .shared_inputs import ATTR, SharedInputGroup
from .tree import lora_layers

Groups = tuple[tuple[str, ...], ...]


def can_link(layer: nn.Module) -> bool:
    """An adapted layer whose forward is the fused Linear one (not quantized, not a subclass
    with its own forward)."""
    if not isinstance(layer, LinearLoraMixin) or type(layer).forward is not LinearLoraMixin.forward:
        return False
    return layer.base_class.forward is layer.fused_base.forward


# Sibling names that read one input in common model code: attention projections (Llama,
# Mistral, Qwen, OPT, BART, Whisper, CLIP; BERT, RoBERTa, ViT; T5; Meta's Llama; DistilBERT;
# DeBERTa) and the two input projections of gated MLPs (Llama-style; Mixtral's experts).
FAMILIES: tuple[frozenset[str], ...] = tuple(
    frozenset(names)
    for names in (
        ("q_proj", "k_proj", "v_proj"),
        ("query", "key", "value"),
        ("q", "k", "v"),
        ("wq", "wk", "wv"),
        ("q_lin", "k_lin", "v_lin"),
        ("query_proj", "key_proj", "value_proj"),
        ("gate_proj", "up_proj"),
        ("w1", "w3"),
    )
)


def link_siblings(model: nn.Module) -> None:
    """Link the adapted children of one module named as one of `FAMILIES`, of one input
    width (what `inject` does). Layers the user turned off or grouped keep that."""
    families: dict[tuple[str, int, int], list[nn.Module]] = defaultdict(list)
    for name, layer in lora_layers(model):
        current = layer.__dict__.get(ATTR)
        if not can_link(layer) or current is False or getattr(current, "named", False):
            continue
        parent, _, leaf = name.rpartition(".")
        family = next((i for i, f in enumerate(FAMILIES) if leaf in f), None)
        if family is not None:
            families[parent, family, layer.lora_dims()[0]].append(layer)
    for layers in families.values():
        group = SharedInputGroup(layers) if len(layers) > 1 else None
        for layer in layers:
            setattr(layer, ATTR, group)


def fuse_shared_inputs(
    model: nn.Module, groups: str | Sequence[Sequence[str]] | None = "auto"
) -> Groups:
    """Choose which adapted layers of `model` take their LoRA input products together.

    groups: "auto" (what `inject` does): the siblings named as one of `FAMILIES` (q_proj,
        k_proj, v_proj; query, key, value; gate_proj, up_proj; ...) with one input width;
        None (or []): off, every layer takes its own product; a list of lists of module
        paths: exactly those groups. Either way each member is checked to read the very
        tensor the others read on every call. Layers adapted later are linked automatically
        among themselves; call this again after `inject` to keep fusion off for them.
    Returns the groups now in force, as module paths (`shared_input_groups`).

    Raises:
        ConfigError: `groups` is not one of the above, a group has fewer than two layers,
            repeats one, or mixes input widths; names the group.
        TargetNotFoundError: a path is no adapted Linear / Conv1D layer of `model`.
    """
    layers = dict(lora_layers(model))
    if groups == "auto":
        for layer in layers.values():
            layer.__dict__.pop(ATTR, None)
        link_siblings(model)
        return shared_input_groups(model)
    named = _checked_groups(layers, groups)
    for layer in layers.values():
        if can_link(layer):
            setattr(layer, ATTR, False)
    for members in named:
        group = SharedInputGroup(members, named=True)
        for layer in members:
            setattr(layer, ATTR, group)
    return shared_input_groups(model)


def _checked_groups(layers: dict[str, nn.Module], groups: object) -> list[list[nn.Module]]:
    """The layers of each named group, or an error naming what is wrong."""
    if groups is None:
        return []
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ConfigError(
            f'groups must be "auto", None or a list of lists of module paths, got {groups!r}'
        )
    out, seen = [], set()
    for group in groups:
        if isinstance(group, str) or not isinstance(group, Sequence) or len(group) < 2:
            raise ConfigError(f"each group must list at least two module paths, got {group!r}")
        members = [_linkable(layers, path) for path in group]
        if len({id(m) for m in members}) < len(members) or seen & {id(m) for m in members}:
            raise ConfigError(f"group {list(group)!r} names a layer twice or one of another group")
        widths = {m.lora_dims()[0] for m in members}
        if len(widths) > 1:
            raise ConfigError(
                f"group {list(group)!r} mixes input widths {sorted(widths)}: its layers cannot "
                "read one input"
            )
        seen |= {id(m) for m in members}
        out.append(members)
    return out


def _linkable(layers: dict[str, nn.Module], path: object) -> nn.Module:
    layer = layers.get(path) if isinstance(path, str) else None
    if layer is None or not can_link(layer):
        linkable = [n for n, m in layers.items() if can_link(m)][:12]
        raise TargetNotFoundError(
            f"{path!r} is no adapted Linear / GPT-2 Conv1D layer of the model; "
            f"adapted ones include {linkable}"
        )
    return layer


def shared_input_groups(model: nn.Module) -> Groups:
    """The groups of two or more layers that take their input products together when they
    read one tensor, as module paths in model order."""
    order = {id(layer): (i, name) for i, (name, layer) in enumerate(lora_layers(model))}
    groups: dict[int, SharedInputGroup] = {}
    for _, layer in lora_layers(model):
        group = layer.__dict__.get(ATTR)
        if group:
            groups.setdefault(id(group), group)
    out = []
    for group in groups.values():
        found = sorted(
            order[id(m)] for m in group.members if id(m) in order and m.__dict__.get(ATTR) is group
        )
        if len(found) > 1:
            out.append(tuple(name for _, name in found))
    return tuple(out)
