"""Trainable tokens (`LoraConfig.trainable_token_indices`): PEFT's `TrainableTokensLayer`.

A few rows of an embedding table train in full while the rest stays frozen, e.g. the rows of
new special tokens. Per adapter, `TokenRows` holds the new rows themselves (`delta`, PEFT's
`trainable_tokens_delta`, initialised as a copy of the selected rows, so a fresh adapter
changes nothing) and the rows as they were (`original`, never saved, for an exact unmerge).

The layer is its base layer with `TrainableTokensMixin` put in front of its class, as LoRA
layers get theirs: forward runs the base forward with `weight` read as the table with the
active adapters' rows put in (PEFT's `get_merged_weights`), so gradients reach `delta` only,
and subclasses that scale their output (Gemma's embeddings) keep doing so. Merge writes the
rows into the weight; unmerge writes the originals back (bit for bit).

A module whose weight *is* the embedding's (a tied lm_head) becomes a tokens layer too, with
a `TiedTokenRows` per adapter that reads the embedding's `TokenRows` (PEFT's `tied_adapter`):
the output layer sees the trained rows, and only the embedding's are saved.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import AdapterError, MergeError, UnsupportedLayerError
from .base import LoraLayer
from .registry import _subclass


class TokenRows(nn.Module):
    """One adapter's trainable rows of one embedding: `delta` (n, dim), the rows the model
    uses; `original`, the rows before (a non-persistent buffer); `token_indices`."""

    def __init__(self, weight: Tensor, token_indices: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.token_indices = tuple(token_indices)
        index = torch.tensor(self.token_indices, dtype=torch.long, device=weight.device)
        self.register_buffer("index", index, persistent=False)
        rows = weight.detach()[index]
        self.register_buffer("original", rows.clone(), persistent=False)
        self.delta = nn.Parameter(rows.to(dtype).clone())

    def rows(self) -> Tensor:
        """The rows to put into the table."""
        return self.delta

    def extra_repr(self) -> str:
        return f"tokens={len(self.token_indices)}, dim={self.delta.shape[-1]}"


class TiedTokenRows(nn.Module):
    """The rows of a module whose weight is tied to an embedding's: the embedding's
    `TokenRows`, read (not owned: no parameters here, nothing saved twice)."""

    def __init__(self, source: TokenRows) -> None:
        super().__init__()
        object.__setattr__(self, "source", source)  # a plain reference, not a submodule

    @property
    def token_indices(self) -> tuple[int, ...]:
        return self.source.token_indices

    @property
    def index(self) -> Tensor:
        return self.source.index

    @property
    def original(self) -> Tensor:
        return self.source.original

    def rows(self) -> Tensor:
        return self.source.delta

    def extra_repr(self) -> str:
        return f"tied, tokens={len(self.token_indices)}"


Rows = TokenRows | TiedTokenRows


def overlap_refusal(layer: LoraLayer, names: Iterable[str]) -> str | None:
    """PEFT's `_check_overlapping_tokens`: two adapters that set one row at once would leave
    it to their order; the message names the adapter and the rows, else None."""
    seen: set[int] = set()
    for name in dict.fromkeys(names):
        ids = set(layer.lora[name].token_indices)
        if ids & seen:
            return (
                f"token indices {sorted(ids & seen)} of adapter {name!r} are already set by "
                "another active or merged adapter; only disjoint token indices can be used "
                "together (as in PEFT)"
            )
        seen |= ids
    return None


class TrainableTokensMixin(LoraLayer):
    """Mixin placed before an Embedding or Linear class: see the module docstring. The
    `lora` ModuleDict holds one `TokenRows` (or `TiedTokenRows`) per adapter."""

    def add_adapter(self, name: str, config: LoraConfig) -> nn.Module:
        raise UnsupportedLayerError(
            f"cannot add LoRA adapter {name!r} to a layer with trainable tokens "
            f"({list(self.lora)}): PEFT does not adapt such a layer with LoRA either"
        )

    def add_token_rows(self, name: str, rows: Rows) -> Rows:
        """Add adapter `name`'s rows (active); `rows` come from `TokenRows` or are tied."""
        if name in self.lora:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        rows.train(self.training)
        self.lora[name] = rows
        self.lora_active = (*self.lora_active, name)
        return rows

    # -- merge ----------------------------------------------------------------------------
    def merge_refusal(self, adapter_name: str) -> str | None:
        return overlap_refusal(self, [*self.lora_merged, *self.lora_active, adapter_name])

    def merge(self, names: tuple[str, ...] | None = None, keep_original: bool = True) -> None:
        """Write the rows of adapters (default: the active ones) into `weight`. The original
        rows are always kept (they are small), so `keep_original` changes nothing."""
        wanted = dict.fromkeys(self.lora_active if names is None else names)
        todo = [n for n in wanted if n not in self.lora_merged]
        if not todo:
            return
        refusal = overlap_refusal(self, [*self.lora_merged, *todo])
        if refusal is not None:
            raise MergeError(refusal)
        weight = self.weight
        with torch.no_grad():
            for name in todo:
                rows = self.lora[name]
                weight.index_copy_(0, rows.index, rows.rows().to(weight.dtype))
                self.lora_merged = (*self.lora_merged, name)

    def unmerge(self, names: tuple[str, ...] | None = None) -> None:
        """Write the original rows of merged adapters (default: all) back, bit for bit."""
        out = [n for n in self.lora_merged if names is None or n in names]
        weight = self.weight
        with torch.no_grad():
            for name in reversed(out):
                rows = self.lora[name]
                weight.index_copy_(0, rows.index, rows.original.to(weight.dtype))
        self.lora_merged = tuple(n for n in self.lora_merged if n not in out)

    # -- forward --------------------------------------------------------------------------
    def tokens_weight(self) -> Tensor | None:
        """The table with the active, unmerged adapters' rows in; None: `weight` as it is."""
        if self.lora_disabled:
            return None
        if self.lora_routing is not None:
            raise UnsupportedLayerError(
                "mixed-adapter batches do not support trainable tokens (lorakit.routing)"
            )
        names = [n for n in self.lora_active if n not in self.lora_merged]
        if not names:
            return None
        refusal = overlap_refusal(self, [*self.lora_merged, *names])
        if refusal is not None:
            raise AdapterError(refusal)
        weight = self.weight
        for name in names:
            rows = self.lora[name]
            weight = weight.index_copy(0, rows.index, rows.rows().to(weight.dtype))
        return weight

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        """The base forward, reading `weight` as `tokens_weight()` (the instance attribute
        shadows the parameter for the call)."""
        weight = self.tokens_weight()
        if weight is None:
            return self.base_class.forward(self, x, *args, **kwargs)
        self.__dict__["weight"] = weight
        try:
            return self.base_class.forward(self, x, *args, **kwargs)
        finally:
            del self.__dict__["weight"]


class TrainableTokensEmbedding(TrainableTokensMixin, nn.Embedding):
    """An `nn.Embedding` with trainable token rows; `weight` keeps its name."""

    base_class = nn.Embedding


class TrainableTokensLinear(TrainableTokensMixin, nn.Linear):
    """An `nn.Linear` (a tied output layer) that reads an embedding's trainable rows."""

    base_class = nn.Linear


_CLASSES = {nn.Embedding: TrainableTokensEmbedding, nn.Linear: TrainableTokensLinear}


def tokens_class(module: nn.Module) -> type[TrainableTokensMixin]:
    """The class that gives `module` trainable tokens, or UnsupportedLayerError naming it."""
    cls = type(module)
    if isinstance(module, TrainableTokensMixin):
        return cls
    if isinstance(module, LoraLayer):
        raise UnsupportedLayerError(
            f"cannot add trainable tokens to a layer that has LoRA adapters ({list(module.lora)}); "
            "PEFT does not allow both on one layer either"
        )
    if cls in _CLASSES:
        return _CLASSES[cls]
    base = next((b for b in _CLASSES if isinstance(module, b)), None)
    if base is None or not isinstance(getattr(module, "weight", None), nn.Parameter):
        raise UnsupportedLayerError(
            f"trainable tokens need an nn.Embedding (or a Linear tied to one), not {cls.__name__}"
        )
    return _subclass(TrainableTokensMixin, cls)


def check_plain_embedding(module: nn.Module, path: str) -> None:
    """Refuse an embedding whose base forward would change the table itself (max_norm
    renormalises rows in place) or not read it as a dense table (a quantized weight)."""
    if getattr(module, "max_norm", None) is not None:
        raise UnsupportedLayerError(
            f"cannot train tokens of {path!r} with max_norm={module.max_norm}: the base "
            "renormalises its rows in place"
        )
    if not module.weight.dtype.is_floating_point:
        raise UnsupportedLayerError(
            f"cannot train tokens of {path!r}: its weight is {module.weight.dtype}, not float"
        )
