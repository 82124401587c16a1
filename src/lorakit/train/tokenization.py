"""Tokenising training records: truncation side, EOS, and completion-only labels.

Examples longer than ``max_length`` tokens are cut on ``truncation_side``: ``"right"``
keeps their start, ``"left"`` their end (for ``prompt`` + ``completion`` the prompt's start
goes and the whole completion stays). A ``messages`` conversation is rendered by the
tokenizer's own chat template and is refused when the cut would reach its last assistant
turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from .records import DataError, Record, where

TruncationSide = Literal["right", "left"]
TRUNCATION_SIDES: tuple[TruncationSide, ...] = get_args(TruncationSide)

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


def encode_messages(
    record: Record, tokenizer: Any, max_length: int, path: str | Path, side: TruncationSide
) -> dict[str, list[int]]:
    """A ``messages`` record, rendered by the tokenizer's chat template, trained on the
    assistant turns only (their content and end-of-turn tokens; everything else -100).

    Each assistant turn's tokens are found by rendering the turns before it with the
    generation prompt and the turns up to it without: both must tokenise to a prefix of
    the whole conversation. A conversation over ``max_length`` is cut on ``side`` only
    while its last assistant turn (with its header, on the left) stays whole.

    Raises:
        DataError: the tokenizer has no chat template; a rendering is not a prefix of the
            conversation's tokens; or the last assistant turn would be cut.
    """
    messages = chat_messages(record)
    require_chat_template(tokenizer, record, path)
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        at = f"{where(record, path)}: messages[{i}]"
        start = _prefix_length(tokenizer, messages[:i], ids, True, at)
        end = _prefix_length(tokenizer, messages[: i + 1], ids, False, at)
        labels[start:end] = ids[start:end]
    if len(ids) > max_length:  # `end` is where the last assistant turn ends
        at = f"{where(record, path)}: messages[{turns[-1]}]"
        keep = _kept_range(tokenizer, messages, ids, turns[-1], end, max_length, side, at)
        ids, labels = ids[keep], labels[keep]
    return {"input_ids": ids, "labels": labels}


def chat_messages(record: Record) -> list[dict[str, str]]:
    """The turns of a ``messages`` record as the chat template sees them: role and content
    only (other keys are ignored)."""
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def require_chat_template(tokenizer: Any, record: Record, path: str | Path) -> None:
    """DataError unless ``tokenizer`` has a chat template to render ``messages`` with."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where(record, path)}: 'messages' records need a tokenizer with a chat "
            "template, and this one has none (use 'prompt' + 'completion' records, or a "
            "model whose tokenizer_config.json has a chat_template)"
        )


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template.

    The template writes any BOS token itself, so the tokenizer adds no special tokens.
    """
    if not messages and not add_generation_prompt:  # some templates index messages[0]
        return []
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_length(
    tokenizer: Any, messages: list[dict], ids: list[int], add_generation_prompt: bool, at: str
) -> int:
    """How many of ``ids`` the rendering of ``messages`` covers; DataError if not a prefix."""
    prefix = chat_ids(tokenizer, messages, add_generation_prompt)
    if ids[: len(prefix)] != prefix:
        raise DataError(
            f"{at}: the chat template's rendering of messages[:{len(messages)}] "
            f"(add_generation_prompt={add_generation_prompt}) does not tokenise to a prefix "
            "of the whole conversation, so this assistant turn's tokens cannot be found"
        )
    return len(prefix)


def _kept_range(
    tokenizer: Any,
    messages: list[dict],
    ids: list[int],
    last: int,
    end: int,
    max_length: int,
    side: TruncationSide,
    at: str,
) -> slice:
    """The ``max_length`` ids kept of an over-long conversation whose last assistant turn,
    ``messages[last]``, ends at ``end``; DataError if that turn would be cut."""
    n = len(ids)
    if side == "right":
        if end > max_length:
            raise DataError(
                f"{at}: the conversation is {n} tokens and its last assistant turn ends at "
                f"token {end}, past max_length={max_length} (truncation_side='right' keeps "
                "the start; 'left' cuts earlier turns)"
            )
        return slice(0, max_length)
    start = _prefix_length(tokenizer, messages[:last], ids, False, at)
    if n - start > max_length:
        raise DataError(
            f"{at}: the conversation is {n} tokens and its last assistant turn with the "
            f"turns after it is {n - start}, more than max_length={max_length} "
            "(truncation_side='left' keeps that turn whole)"
        )
    return slice(n - max_length, n)
