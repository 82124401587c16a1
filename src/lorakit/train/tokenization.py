"""Tokenising training records: truncation side, EOS, and completion-only labels.

Examples longer than ``max_length`` tokens are cut on ``truncation_side``: ``"right"``
keeps their start, ``"left"`` their end (for ``prompt`` + ``completion`` the prompt's start
goes and the whole completion stays).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from .records import DataError, Record, where

TruncationSide = Literal["right", "left"]
TRUNCATION_SIDES = ("right", "left")

IGNORE_INDEX = -100
"""Label value ignored by PyTorch / Hugging Face cross-entropy losses."""


def tokenize_texts(
    texts: Sequence[str], tokenizer: Any, max_length: int, side: TruncationSide
) -> list[list[int]]:
    """Token ids of each text, cut by the tokenizer to ``max_length`` on ``side``.

    The tokenizer truncates, so its special tokens (e.g. ``[CLS]``/``[SEP]``) survive.
    """
    # The side is tokenizer state, not a call argument: set it for this call only.
    saved = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = saved


def with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """Append the EOS id unless absent or already there."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def truncate(ids: list[int], max_length: int, side: TruncationSide) -> list[int]:
    """At most ``max_length`` ids: the first ones (``"right"``) or the last (``"left"``)."""
    return ids[:max_length] if side == "right" else ids[max(0, len(ids) - max_length) :]


def encode_text(
    record: Record, tokenizer: Any, max_length: int, path: str | Path, side: TruncationSide
) -> dict[str, list[int]]:
    """A ``text`` record, trained on every token (EOS appended, then truncated)."""
    ids = with_eos(tokenizer(record["text"])["input_ids"], tokenizer)
    ids = truncate(ids, max_length, side)
    return {"input_ids": ids, "labels": list(ids)}


def encode_prompt_completion(
    record: Record, tokenizer: Any, max_length: int, path: str | Path, side: TruncationSide
) -> dict[str, list[int]]:
    """A ``prompt`` + ``completion`` record, trained on the completion only.

    Prompt labels are :data:`IGNORE_INDEX`. ``side="left"`` keeps the whole completion
    after the prompt's last tokens (a leading BOS token is cut with the prompt's start).

    Raises:
        DataError: the kept part (prompt on the right, completion on the left) leaves no
            room for the other within ``max_length``.
    """
    prompt = tokenizer(record["prompt"])["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    completion = with_eos(completion, tokenizer)
    if side == "right" and len(prompt) >= max_length:
        raise DataError(
            f"{where(record, path)}: prompt is {len(prompt)} tokens, leaving no room for the "
            f"completion within max_length={max_length} (truncation_side='left' cuts the "
            "prompt's start)"
        )
    if side == "left":
        if len(completion) >= max_length:
            raise DataError(
                f"{where(record, path)}: completion is {len(completion)} tokens, leaving no "
                f"room for the prompt within max_length={max_length} (truncation_side='left' "
                "keeps the whole completion)"
            )
        prompt = truncate(prompt, max_length - len(completion), side)
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}
