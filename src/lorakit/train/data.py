"""Training data for ``lorakit finetune``: reading, validation, labels, tokenisation, batching.

Input formats
-------------
* ``.jsonl`` / ``.json``: one JSON object per line, UTF-8. Blank lines are skipped.
* ``.csv``: UTF-8, a header row naming the fields (read with :class:`csv.DictReader`).
  The header is line 1, so the first record is line 2. CSV values are always strings.

Fields per task
---------------
* ``seq-cls`` (sequence classification): ``text`` (non-empty string) and ``label``
  (string or integer). Labels are compared as strings, so ``1`` and ``"1"`` are the same
  class; class ids are assigned in sorted string order by :func:`build_label_map`.
* ``causal-lm``: either ``text`` (loss on every token), or ``prompt`` + ``completion``
  (loss on the completion tokens only; prompt tokens get label ``-100``).

Truncation and padding
----------------------
Examples longer than ``max_length`` tokens are cut on ``truncation_side``: ``"right"``
keeps their start, ``"left"`` their end (for ``prompt`` + ``completion`` the prompt's start
goes and the whole completion stays). :class:`Collator` pads each batch to its longest
example, or to a fixed ``pad_to`` (``--padding max-length``).

Every record returned by :func:`read_records` carries its 1-based source line under the
key :data:`LINE_KEY`, so later errors (missing field, unseen label) can point at it even
after :func:`split_eval` has shuffled the records.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from lorakit.config import check_choice
from lorakit.errors import LorakitError

Task = Literal["seq-cls", "causal-lm"]
TruncationSide = Literal["right", "left"]
TRUNCATION_SIDES = ("right", "left")
Record = dict[str, Any]

LINE_KEY = "_line"
"""Record key holding the 1-based line number the record was read from."""

IGNORE_INDEX = -100
"""Label value ignored by PyTorch / Hugging Face cross-entropy losses."""


class DataError(LorakitError, ValueError):
    """A training data file is missing, unreadable or has invalid content."""


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- validation


def _where(record: Record, path: str | Path) -> str:
    """``"<file>, line N"`` for error messages."""
    return f"{path}, line {record.get(LINE_KEY, '?')}"


def _check_text(record: Record, field: str, path: str | Path) -> None:
    """Require ``record[field]`` to be a non-empty string."""
    if field not in record or record[field] is None:
        raise DataError(f"{_where(record, path)}: missing field {field!r}")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            f"{_where(record, path)}: field {field!r} must be a non-empty string, got {value!r}"
        )


def _check_label(record: Record, path: str | Path) -> None:
    """Require ``record["label"]`` to be a non-empty string or an integer."""
    if "label" not in record or record["label"] is None:
        raise DataError(f"{_where(record, path)}: missing field 'label'")
    label = record["label"]
    ok = (isinstance(label, int) and not isinstance(label, bool)) or (
        isinstance(label, str) and label.strip() != ""
    )
    if not ok:
        raise DataError(
            f"{_where(record, path)}: field 'label' must be a string or integer, got {label!r}"
        )


def validate_records(records: Sequence[Record], task: Task, path: str | Path) -> None:
    """Check every record has the fields ``task`` needs; raise DataError on the first bad one."""
    if task not in ("seq-cls", "causal-lm"):
        raise ValueError(f"unknown task {task!r} (expected 'seq-cls' or 'causal-lm')")
    for record in records:
        if task == "seq-cls":
            _check_text(record, "text", path)
            _check_label(record, path)
        elif _has_value(record, "text"):
            _check_text(record, "text", path)
        elif _has_value(record, "prompt") or _has_value(record, "completion"):
            _check_prompt_completion(record, path)
        else:
            raise DataError(
                f"{_where(record, path)}: missing field 'text' "
                "(causal-lm needs 'text', or 'prompt' and 'completion')"
            )


def _has_value(record: Record, field: str) -> bool:
    """True if ``field`` is present and not None / empty (CSV gives '' for blanks)."""
    return record.get(field) not in (None, "")


def _check_prompt_completion(record: Record, path: str | Path) -> None:
    """Require a string ``prompt`` (may be empty) and a non-empty string ``completion``."""
    if not isinstance(record.get("prompt"), str):
        raise DataError(f"{_where(record, path)}: missing field 'prompt' (must be a string)")
    _check_text(record, "completion", path)


# --------------------------------------------------------------------------- labels


def build_label_map(
    train_records: Sequence[Record], path: str | Path = "the training data"
) -> dict[str, int]:
    """Map each distinct training label (as a string) to a class id, in sorted order.

    Raises:
        DataError: fewer than 2 distinct labels (a classifier of one class learns nothing,
            yet reports accuracy 1.0); the message names `path` and the field.
    """
    labels = sorted({str(r["label"]) for r in train_records})
    if len(labels) < 2:
        raise DataError(
            f"{path}: field 'label' has {len(labels)} distinct value(s) {labels} in the "
            "training records; classification needs at least 2 classes"
        )
    return {label: i for i, label in enumerate(labels)}


def encode_labels(
    records: Sequence[Record], label_map: dict[str, int], path: str | Path
) -> list[int]:
    """Return the class id of every record; raise DataError for labels unseen in training."""
    ids = []
    for record in records:
        label = str(record["label"])
        if label not in label_map:
            known = ", ".join(repr(k) for k in label_map)
            raise DataError(
                f"{_where(record, path)}: label {label!r} does not occur in the training "
                f"data (known labels: {known})"
            )
        ids.append(label_map[label])
    return ids


# --------------------------------------------------------------------------- splitting


def split_eval(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Shuffle deterministically with ``seed`` and hold out ``fraction`` as eval records."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(records) < 2:
        raise DataError(f"need at least 2 records to split off eval data, got {len(records)}")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n_eval = min(max(1, round(len(shuffled) * fraction)), len(shuffled) - 1)
    return shuffled[n_eval:], shuffled[:n_eval]


# --------------------------------------------------------------------------- tokenisation


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id (e.g. GPT-2, Llama)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError("tokenizer has neither a pad token nor an EOS token to pad with")


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
        # The side is tokenizer state, not a call argument: set it for this call only.
        saved = tokenizer.truncation_side
        tokenizer.truncation_side = truncation_side
        try:
            encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        finally:
            tokenizer.truncation_side = saved
        self.examples = [{"input_ids": ids, "labels": y} for ids, y in zip(encoded, labels)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


class CausalLMDataset(Dataset):
    """Tokenised causal-LM examples: ``{"input_ids": [...], "labels": [...]}`` (same length).

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
        self.examples = [
            _encode_causal(r, tokenizer, max_length, path, truncation_side) for r in records
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    """Append the EOS id unless absent or already there."""
    eos = tokenizer.eos_token_id
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _truncate(ids: list[int], max_length: int, side: TruncationSide) -> list[int]:
    """At most ``max_length`` ids: the first ones (``"right"``) or the last (``"left"``)."""
    return ids[:max_length] if side == "right" else ids[max(0, len(ids) - max_length) :]


def _encode_causal(
    record: Record, tokenizer: Any, max_length: int, path: str | Path, side: TruncationSide
) -> dict[str, list[int]]:
    """Tokenise one causal-LM record, masking the prompt part of the labels."""
    if _has_value(record, "text"):
        ids = _with_eos(tokenizer(record["text"])["input_ids"], tokenizer)
        ids = _truncate(ids, max_length, side)
        return {"input_ids": ids, "labels": list(ids)}
    prompt = tokenizer(record["prompt"])["input_ids"]
    completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
    completion = _with_eos(completion, tokenizer)
    where = _where(record, path)
    if side == "right" and len(prompt) >= max_length:
        raise DataError(
            f"{where}: prompt is {len(prompt)} tokens, leaving no room for the completion "
            f"within max_length={max_length} (truncation_side='left' cuts the prompt's start)"
        )
    if side == "left":
        if len(completion) >= max_length:
            raise DataError(
                f"{where}: completion is {len(completion)} tokens, leaving no room for the "
                f"prompt within max_length={max_length} (truncation_side='left' keeps the "
                "whole completion)"
            )
        prompt = _truncate(prompt, max_length - len(completion), side)
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


# --------------------------------------------------------------------------- batching


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
