"""The running batch's key/value cache: one row per sequence, rows aligned on the right.

Sequences of different lengths share one transformers `DynamicCache`: a shorter row is padded
on the left with zero keys and values that its attention mask hides, so every row's next
token sits in the same column. A sequence joins with the cache of its own prefill (computed
alone, so no padded query is ever attended from), and leaves by dropping its row; columns
that no remaining row uses are cut off the left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError


class BatchCache:
    """Keys/values (per layer: batch, heads, length, head_dim) and the (batch, length) mask."""

    def __init__(self) -> None:
        self.cache = None  # a transformers DynamicCache once a row has joined
        self.mask: Tensor | None = None

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, cache: object) -> None:
        """Append the one-row cache of a freshly prefilled sequence as the last row."""
        layers = _layers(cache)
        length = layers[0].keys.shape[-2]
        mask = torch.ones(1, length, dtype=torch.long, device=layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(length, self.mask.shape[1])
        for mine, new in zip(_layers(self.cache), layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(new.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(new.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); empty: forget everything."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.argmax(dim=1).min())  # the first column some row still uses
        self.mask = mask[:, first:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """(attention_mask over cache + one new token, position of each row's new token)."""
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.mask.sum(dim=1, keepdim=True)

    def stepped(self, attention_mask: Tensor) -> None:
        """Record that the step ran with `attention_mask` (the cache grew by its new column)."""
        self.mask = attention_mask


def _left_pad(t: Tensor, width: int) -> Tensor:
    """Zeros in front of the length dim (-2 of keys/values, -1 of a mask) up to `width`."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _layers(cache: object) -> list:
    """The cache's per-layer key/value holders, refusing caches that are not plain full ones."""
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "is_sliding", True) for layer in layers):
        raise ConfigError(
            "serving needs a model with a plain key/value cache (full attention in every "
            f"layer); got {type(cache).__name__}"
        )
    return layers
