"""Field checks for training records; each error names the file, line and field.

One ``check_*`` per record format (see :mod:`lorakit.train.formats`), built from
:func:`check_text`, which every format with text fields shares.
"""

from __future__ import annotations

from pathlib import Path

from .records import DataError, Record, where


def check_text(record: Record, field: str, path: str | Path) -> None:
    """Require ``record[field]`` to be a non-empty string."""
    if field not in record or record[field] is None:
        raise DataError(f"{where(record, path)}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{where(record, path)}: field {field!r} must be a non-empty string, got {value!r}"
        )


def check_label(record: Record, path: str | Path) -> None:
    """Require ``record["label"]`` to be a non-empty string or an integer."""
    if "label" not in record or record["label"] is None:
        raise DataError(f"{where(record, path)}: missing field 'label'")
    label = record["label"]
    ok = (isinstance(label, int) and not isinstance(label, bool)) or (
        isinstance(label, str) and label.strip() != ""
    )
    if not ok:
        raise DataError(
            f"{where(record, path)}: field 'label' must be a string or integer, got {label!r}"
        )


def check_text_record(record: Record, path: str | Path) -> None:
    """A ``text`` record: ``text`` is a non-empty string."""
    check_text(record, "text", path)


def check_text_label(record: Record, path: str | Path) -> None:
    """A ``text`` + ``label`` record: non-empty ``text``, a string or integer ``label``."""
    check_text(record, "text", path)
    check_label(record, path)


def check_prompt_completion(record: Record, path: str | Path) -> None:
    """Require a string ``prompt`` (may be empty) and a non-empty string ``completion``."""
    if not isinstance(record.get("prompt"), str):
        raise DataError(f"{where(record, path)}: missing field 'prompt' (must be a string)")
    check_text(record, "completion", path)
