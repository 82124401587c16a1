"""Tokenised training examples as torch datasets, one class per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lorakit.config import check_choice

from .formats import record_format
from .labels import encode_labels
from .records import Record
from .tokenization import TRUNCATION_SIDES, TruncationSide, tokenize_texts


class SeqClsDataset(Dataset):
    """Tokenised sequence-classification examples: ``{"input_ids": [...], "labels": int}``.

    The tokenizer truncates, so its special tokens (e.g. ``[CLS]``/``[SEP]``) survive on
    either ``truncation_side``.
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        label_map: dict[str, int],
        max_length: int,
        path: str | Path,
        truncation_side: TruncationSide = "right",
    ) -> None:
        check_choice(truncation_side, "truncation_side", TRUNCATION_SIDES)
        labels = encode_labels(records, label_map, path)
        texts = [r["text"] for r in records]
        encoded = tokenize_texts(texts, tokenizer, max_length, truncation_side)
        self.examples = [{"input_ids": ids, "labels": y} for ids, y in zip(encoded, labels)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class CausalLMDataset(Dataset):
    """Tokenised causal-LM examples: ``{"input_ids": [...], "labels": [...]}`` (same length).

    Each record is tokenised by its format's encoder (see :data:`~.formats.FORMATS`):
    ``text`` records are trained on every token; ``prompt`` + ``completion`` records only
    on the completion (prompt labels are ``-100``). An EOS token is appended when the
    tokenizer has one, so the model learns where to stop. ``truncation_side="left"`` keeps
    the end of a ``text`` and, for ``prompt`` + ``completion``, the whole completion after
    the prompt's last tokens (a leading BOS token is cut with the prompt's start).
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        max_length: int,
        path: str | Path,
        truncation_side: TruncationSide = "right",
    ) -> None:
        check_choice(truncation_side, "truncation_side", TRUNCATION_SIDES)
        self.examples = [_encode(r, tokenizer, max_length, path, truncation_side) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def _encode(
    record: Record, tokenizer: Any, max_length: int, path: str | Path, side: TruncationSide
) -> dict[str, list[int]]:
    """One causal-LM record through its format's encoder."""
    encode = record_format(record, "causal-lm", path).encode
    assert encode is not None, "every causal-lm format has an encoder"
    return encode(record, tokenizer, max_length, path, side)
