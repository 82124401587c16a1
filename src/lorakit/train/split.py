"""Hold out evaluation records: a deterministic shuffle, then a fraction off the front."""

from __future__ import annotations

import random
from collections.abc import Sequence

from .records import DataError, Record


def split_eval(
    records: Sequence[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Shuffle deterministically with ``seed`` and hold out ``fraction`` as eval records.

    Returns ``(train, eval)``; each gets at least one record.

    Raises:
        DataError: ``fraction`` outside (0, 1), or fewer than 2 records.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(records) < 2:
        raise DataError(f"need at least 2 records to split off eval data, got {len(records)}")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    n_eval = min(max(1, round(len(shuffled) * fraction)), len(shuffled) - 1)
    return shuffled[n_eval:], shuffled[:n_eval]
