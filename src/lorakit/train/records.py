"""Training records: read a ``.jsonl``/``.json`` or ``.csv`` file into dicts that remember
their source line.

* ``.jsonl`` / ``.json``: one JSON object per line, UTF-8. Blank lines are skipped.
* ``.csv``: UTF-8, a header row naming the fields (read with :class:`csv.DictReader`).
  The header is line 1, so the first record is line 2. CSV values are always strings.

Every record carries its 1-based source line under :data:`LINE_KEY`, so later errors
(missing field, unseen label) can point at it even after the records were shuffled.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

Record = dict[str, Any]

LINE_KEY = "_line"
"""Record key holding the 1-based line number the record was read from."""


class DataError(LorakitError, ValueError):
    """A training data file is missing, unreadable or has invalid content."""


def where(record: Record, path: str | Path) -> str:
    """``"<file>, line N"`` for error messages."""
    return f"{path}, line {record.get(LINE_KEY, '?')}"


def has_value(record: Record, field: str) -> bool:
    """True if ``field`` is present and not None / empty (CSV gives '' for blanks)."""
    return record.get(field) not in (None, "")


def read_records(path: str | Path) -> list[Record]:
    """Read a ``.jsonl``/``.json`` or ``.csv`` file into a list of dict records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = _read_utf8(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _parse_jsonl(text, path)
    elif suffix == ".csv":
        records = _parse_csv(text, path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .csv)")
    if not records:
        raise DataError(f"{path}: file is empty (no records found)")
    return records


def _read_utf8(path: Path) -> str:
    """Return the file's text, raising DataError with the byte offset if not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}, line {line}: not valid UTF-8 (bad byte at offset {e.start}); "
            "re-save the file as UTF-8"
        ) from None


def _parse_jsonl(text: str, path: Path) -> list[Record]:
    """Parse JSON Lines text: one object per non-blank line."""
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        obj = _load_json_line(line, path, line_no)
        if not isinstance(obj, dict):
            raise DataError(
                f"{path}, line {line_no}: expected a JSON object, got {type(obj).__name__}"
            )
        records.append({**obj, LINE_KEY: line_no})
    return records


def _load_json_line(line: str, path: Path, line_no: int) -> Any:
    """One JSON value; malformed, too deeply nested or oversized input is a DataError."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {line_no}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(f"{path}, line {line_no}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(f"{path}, line {line_no}: unreadable JSON value ({e})") from None


def _parse_csv(text: str, path: Path) -> list[Record]:
    """Parse CSV text with a header row; the header is line 1."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = []
    try:
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}, line {reader.line_num}: row has more fields than the header"
                )
            records.append({**row, LINE_KEY: reader.line_num})
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: invalid CSV ({e})") from None
    return records
