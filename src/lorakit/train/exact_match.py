"""Exact match, for evaluating a causal LM by what it generates: the prompt to answer, the
reference answer, and the comparison (after stripping whitespace)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .formats import record_format
from .records import DataError, Record, where
from .tokenization import chat_ids, chat_messages, require_chat_template


def prompt_and_reference(
    record: Record, tokenizer: Any, path: str | Path = "<records>"
) -> tuple[list[int], str]:
    """The token ids to generate from and the answer expected, for one causal-LM record.

    * ``messages``: every turn before the last assistant turn, rendered by the tokenizer's
      chat template with the generation prompt; the reference is that turn's content.
    * ``prompt`` + ``completion``: the prompt, tokenised as in training; the reference is
      the completion.

    Ids, not text, so the prompt is tokenised exactly as in training (a rendered chat
    template holds its own special tokens; a plain prompt gets the tokenizer's).

    Raises:
        DataError: a ``text`` record (it has no reference), or a chat and a tokenizer
            without a chat template.
    """
    fmt = record_format(record, "causal-lm", path)
    if fmt.name == "prompt+completion":
        return tokenizer(record["prompt"])["input_ids"], record["completion"]
    if fmt.name != "messages":
        raise DataError(
            f"{where(record, path)}: exact match needs 'prompt' and 'completion', or "
            f"'messages' records (a {fmt.name!r} record has no reference answer)"
        )
    require_chat_template(tokenizer, record, path)
    messages = chat_messages(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return chat_ids(tokenizer, messages[:last], True), messages[last]["content"]


def exact_match(answer: str, reference: str) -> bool:
    """True if ``answer`` equals ``reference`` once leading/trailing whitespace is stripped."""
    return answer.strip() == reference.strip()
