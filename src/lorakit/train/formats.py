"""Record formats: the fields a record has decide how it is checked and tokenised.

* ``seq-cls``: ``text`` (non-empty string) and ``label`` (string or integer).
* ``causal-lm``: ``text`` (loss on every token), ``prompt`` + ``completion`` (loss on
  the completion tokens only; prompt tokens get label ``-100``), or ``messages`` (a chat:
  ``[{"role": "system"|"user"|"assistant", "content": ...}]``, rendered by the
  tokenizer's chat template; loss on the assistant turns only).

:data:`FORMATS` is the one place that lists them. A new format is a check in
``data_checks.py``, an encoder in ``tokenization.py`` and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_checks import (
    check_messages,
    check_prompt_completion,
    check_text_label,
    check_text_record,
)
from .options import Task
from .records import DataError, Record, has_value, where
from .tokenization import (
    TruncationSide,
    encode_messages,
    encode_prompt_completion,
    encode_text,
)

Check = Callable[[Record, str | Path], None]
Encoder = Callable[[Record, Any, int, str | Path, TruncationSide], dict[str, list[int]]]


@dataclass(frozen=True)
class RecordFormat:
    """One way to write a training record.

    Attributes:
        name: e.g. ``"prompt+completion"``.
        fields: the fields it needs, in the order error messages name them.
        marked_by: a record is in this format when any of these fields has a value;
            empty for a task's only format (its check then names what is missing).
        check: raises DataError naming file, line and field when a field is malformed.
        encode: one record to ``input_ids`` and ``labels``; None where the dataset
            tokenises all records as one batch (``seq-cls``).
    """

    name: str
    fields: tuple[str, ...]
    marked_by: tuple[str, ...]
    check: Check
    encode: Encoder | None

    def marks(self, record: Record) -> bool:
        """True if ``record`` is written in this format."""
        return not self.marked_by or any(has_value(record, f) for f in self.marked_by)

    def describe(self) -> str:
        """The fields for messages: ``'prompt' and 'completion'``."""
        return " and ".join(repr(f) for f in self.fields)


TEXT_LABEL = RecordFormat("text+label", ("text", "label"), (), check_text_label, None)
TEXT = RecordFormat("text", ("text",), ("text",), check_text_record, encode_text)
PROMPT_COMPLETION = RecordFormat(
    "prompt+completion",
    ("prompt", "completion"),
    ("prompt", "completion"),
    check_prompt_completion,
    encode_prompt_completion,
)
MESSAGES = RecordFormat("messages", ("messages",), ("messages",), check_messages, encode_messages)

FORMATS: dict[Task, tuple[RecordFormat, ...]] = {
    "seq-cls": (TEXT_LABEL,),
    # The first format that marks a record wins: a record with a text is a text record.
    "causal-lm": (TEXT, PROMPT_COMPLETION, MESSAGES),
}
"""The record formats each task accepts, in the order they are tried."""


def record_format(record: Record, task: Task, path: str | Path) -> RecordFormat:
    """The format ``record`` is written in for ``task`` (its fields not yet checked).

    Raises:
        ValueError: ``task`` is not a key of :data:`FORMATS`.
        DataError: no format of ``task`` fits; names the file, line and a missing field.
    """
    formats = task_formats(task)
    for fmt in formats:
        if fmt.marks(record):
            return fmt
    needs = ", or ".join(fmt.describe() for fmt in formats)
    raise DataError(
        f"{where(record, path)}: missing field {formats[0].fields[0]!r} ({task} needs {needs})"
    )


def task_formats(task: Task) -> tuple[RecordFormat, ...]:
    """The formats of ``task``; ValueError for an unknown task."""
    if task not in FORMATS:
        expected = " or ".join(repr(t) for t in FORMATS)
        raise ValueError(f"unknown task {task!r} (expected {expected})")
    return FORMATS[task]


def validate_records(records: Sequence[Record], task: Task, path: str | Path) -> None:
    """Check every record has the fields ``task`` needs; raise DataError on the first bad one."""
    task_formats(task)  # an unknown task fails even without records
    for record in records:
        record_format(record, task, path).check(record, path)
