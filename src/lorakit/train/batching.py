"""Batching: pad tokenised examples into tensors for a DataLoader.

:class:`Collator` pads each batch to its longest example, or to a fixed ``pad_to``
(``--padding max-length``). Padding is on the right; padded label positions are ``-100``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .records import DataError
from .tokenization import IGNORE_INDEX


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id (e.g. GPT-2, Llama)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError("tokenizer has neither a pad token nor an EOS token to pad with")


def collate(
    batch: Sequence[dict[str, Any]], pad_token_id: int, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example, or to ``pad_to`` tokens when given.

    Returns ``input_ids`` and ``attention_mask`` of shape (batch, width) and ``labels``:
    shape (batch,) for classification, or (batch, width) with ``-100`` on padding for LM;
    width = ``pad_to`` or the longest example's length.
    """
    longest = max(len(ex["input_ids"]) for ex in batch)
    if pad_to is not None:
        if longest > pad_to:
            raise DataError(f"an example has {longest} tokens, more than pad_to={pad_to}")
        longest = pad_to
    input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": _collate_labels(batch, longest),
    }


def _collate_labels(batch: Sequence[dict[str, Any]], longest: int) -> torch.Tensor:
    """Stack int labels, or right-pad per-token labels with -100."""
    if isinstance(batch[0]["labels"], int):
        return torch.tensor([ex["labels"] for ex in batch], dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        labels[row, : len(ex["labels"])] = torch.tensor(ex["labels"], dtype=torch.long)
    return labels


class Collator:
    """Picklable ``collate_fn`` for a DataLoader: ``DataLoader(ds, collate_fn=Collator(pad))``.

    ``pad_to=None`` pads each batch to its longest example (dynamic padding); an int pads
    every batch to exactly that many tokens (fixed shapes, e.g. ``max_length``).
    """

    def __init__(self, pad_token_id: int, pad_to: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id, self.pad_to)
