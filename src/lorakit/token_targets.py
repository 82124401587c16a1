"""Which embeddings `trainable_token_indices` selects, what is tied to them, and adding the
rows: every check runs against the model before anything on it changes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .config import LoraConfig
from .errors import ConfigError, TargetNotFoundError
from .layers.trainable_tokens import (
    TiedTokenRows,
    TokenRows,
    TrainableTokensMixin,
    check_plain_embedding,
    tokens_class,
)
from .names import name_matches
from .token_indices import OPTION, check_ids_fit
from .tree import base_modules

Modules = list[tuple[str, nn.Module]]
# PEFT's fallback when a model has no `get_input_embeddings`
EMBED_TOKENS = "embed_tokens"


@dataclass(frozen=True)
class TokenTarget:
    """One embedding whose rows `token_indices` train, and the modules tied to its weight."""

    path: str
    module: nn.Module
    token_indices: tuple[int, ...]
    tied: tuple[tuple[str, nn.Module], ...] = ()


def find_token_targets(
    model: nn.Module, config: LoraConfig, lora_targets: Modules = ()
) -> list[TokenTarget]:
    """The embeddings `config.trainable_token_indices` selects, checked, in model order.

    Raises:
        ConfigError: no input embedding, a selected module is not an nn.Embedding, an id is
            past its end, or it is also a LoRA target or in `modules_to_save`.
        TargetNotFoundError: a name of the dict form matches no module.
        UnsupportedLayerError: the embedding (or a module tied to it) cannot take tokens.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return []
    modules = list(base_modules(model))
    selected = _selected(model, modules, spec)
    lora_paths = {path for path, _ in lora_targets}
    found = []
    for option, path, module, ids in selected:
        _check_embedding(option, path, module, ids, config)
        if path in lora_paths:
            raise ConfigError(
                f"{option}: {path!r} is also a LoRA target; train its rows or adapt it with "
                "LoRA, not both (PEFT refuses it too)"
            )
        tied = _tied(modules, module, path)
        both = [p for p, _ in tied if p in lora_paths]
        if both:
            raise ConfigError(
                f"{option}: {both} share(s) the weight of {path!r} and is also a LoRA target; "
                "exclude it from the targets or untie the weights"
            )
        for _, other in tied:
            tokens_class(other)
        found.append(TokenTarget(path, module, ids, tied))
    return found


def _selected(
    model: nn.Module, modules: Modules, spec: tuple[int, ...] | Mapping[str, tuple[int, ...]]
) -> list[tuple[str, str, nn.Module, tuple[int, ...]]]:
    """(option shown in errors, path, module, ids) for each selected module, in model order."""
    if not isinstance(spec, Mapping):
        path, module = _input_embedding(model, modules, spec)
        return [(OPTION, path, module, spec)]
    chosen: dict[str, tuple[str, nn.Module, tuple[int, ...]]] = {}
    for name, ids in spec.items():
        option = f"{OPTION}[{name!r}]"
        matched = [(p, m) for p, m in modules if p and name_matches(p, (name,))]
        if not matched:
            raise TargetNotFoundError(
                f"{option}: {name!r} matched no module of {type(model).__name__}"
            )
        for path, module in matched:
            if path in chosen:
                raise ConfigError(f"{option}: {path!r} is also selected by {chosen[path][0]}")
            chosen[path] = (option, module, ids)
    return [(chosen[p][0], p, *chosen[p][1:]) for p, _ in modules if p in chosen]


def _input_embedding(
    model: nn.Module, modules: Modules, spec: tuple[int, ...]
) -> tuple[str, nn.Module]:
    """The model's input embedding (`get_input_embeddings()`, else a module named
    "embed_tokens"), as PEFT picks it for the list form."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    for path, module in modules:
        if not path:
            continue
        if module is embedding or (embedding is None and path.split(".")[-1] == EMBED_TOKENS):
            return path, module
    raise ConfigError(
        f"{OPTION}={list(spec)!r}: no input embedding found in {type(model).__name__} (no "
        f"get_input_embeddings(), no module named {EMBED_TOKENS!r}); name the embedding: "
        f"{OPTION}={{'<module name>': [...]}}"
    )


def _check_embedding(
    option: str, path: str, module: nn.Module, ids: tuple[int, ...], config: LoraConfig
) -> None:
    """The selected module is an embedding that can take these ids."""
    if not isinstance(module, nn.Embedding):
        raise ConfigError(
            f"{option}: {path!r} is a {type(module).__name__}, not an nn.Embedding; "
            "trainable tokens are rows of an embedding table"
        )
    check_ids_fit(ids, module.num_embeddings, option, path)
    if name_matches(path, config.modules_to_save):
        raise ConfigError(
            f"{option}: {path!r} is also in modules_to_save={list(config.modules_to_save)!r}; "
            "train it in full or train some of its rows, not both"
        )
    tokens_class(module)
    check_plain_embedding(module, path)


def _tied(modules: Modules, module: nn.Module, path: str) -> tuple[tuple[str, nn.Module], ...]:
    """The other modules whose `weight` is `module`'s very parameter (a tied lm_head)."""
    weight = module.weight
    return tuple(
        (p, m) for p, m in modules
        if m is not module and m._parameters.get("weight") is weight
    )  # fmt: skip


def add_token_adapters(
    targets: list[TokenTarget], adapter_name: str, config: LoraConfig
) -> list[nn.Module]:
    """Give each target (and the modules tied to it) the rows of `adapter_name`; returns the
    rows modules added, for the caller to register."""
    added = []
    for target in targets:
        layer = _as_tokens_layer(target.module)
        dtype = config.dtype or layer.weight.dtype
        rows = TokenRows(layer.weight, target.token_indices, dtype)
        added.append(layer.add_token_rows(adapter_name, rows))
        for _, other in target.tied:
            added.append(_as_tokens_layer(other).add_token_rows(adapter_name, TiedTokenRows(rows)))
    return added


def _as_tokens_layer(module: nn.Module) -> TrainableTokensMixin:
    if isinstance(module, TrainableTokensMixin):
        return module
    return tokens_class(module).adapt(module)  # type: ignore[return-value]


def token_layers(model: nn.Module) -> list[tuple[str, TrainableTokensMixin]]:
    """Every layer of `model` with trainable tokens, with its path."""
    return [(p, m) for p, m in base_modules(model) if isinstance(m, TrainableTokensMixin)]
