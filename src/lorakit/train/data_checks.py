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


ROLES = ("system", "user", "assistant")
"""The roles a ``messages`` turn may have."""


def check_messages(record: Record, path: str | Path) -> None:
    """Require ``messages``: a non-empty list of ``{"role", "content"}`` objects.

    Each role is one of :data:`ROLES` and each content a string (non-empty for an
    assistant turn, which is what the model learns); at least one turn is an assistant's.
    """
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where(record, path)}: field 'messages' must be a non-empty list of "
            f"{{'role': ..., 'content': ...}} objects, got {messages!r}"
        )
    for index, message in enumerate(messages):
        _check_message(message, f"{where(record, path)}: messages[{index}]")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            f"{where(record, path)}: field 'messages' has no assistant turn "
            "(the loss is on assistant turns only)"
        )


def _check_message(message: object, at: str) -> None:
    """One turn; ``at`` is ``"<file>, line N: messages[i]"``."""
    if not isinstance(message, dict):
        raise DataError(f"{at}: must be an object with 'role' and 'content', got {message!r}")
    for field in ("role", "content"):
        if field not in message:
            raise DataError(f"{at}: missing field {field!r}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DataError(f"{at}.role: unknown role {role!r} (expected system, user or assistant)")
    if not isinstance(content, str):
        raise DataError(f"{at}.content: must be a string, got {content!r}")
    if role == "assistant" and not content.strip():
        raise DataError(f"{at}.content: an assistant turn must be a non-empty string")
