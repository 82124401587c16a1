"""Class labels for sequence classification: the label map and each record's class id.

Labels are compared as strings, so ``1`` and ``"1"`` are the same class; class ids are
assigned in sorted string order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .records import DataError, Record, where


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
                f"{where(record, path)}: label {label!r} does not occur in the training "
                f"data (known labels: {known})"
            )
        ids.append(label_map[label])
    return ids
