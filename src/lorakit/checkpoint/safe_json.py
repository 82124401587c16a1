"""JSON from files a user did not write: every failure a CheckpointError, nesting bounded.

Python's json raises ValueError for over-long integers, RecursionError for deep nesting, and a
value nested just below the recursion limit would break later (json.dumps, ==) instead; so
parsing refuses anything nested deeper than any adapter config or header needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from ..errors import CheckpointError

MAX_DEPTH = 64


def parse_json(
    text: str | bytes,
    source: str,
    object_pairs_hook: Callable[[list[tuple[str, object]]], object] | None = None,
) -> object:
    """The value of JSON `text`; `source` (file and field) names it in the error."""
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise CheckpointError(f"{source} is nested too deeply to be JSON lorakit reads") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, int digit limit, ...
        raise CheckpointError(f"{source} is not valid JSON: {err}") from None
    if _depth(value) > MAX_DEPTH:
        raise CheckpointError(f"{source} is nested deeper than {MAX_DEPTH} levels")
    return value


def _depth(value: object) -> int:
    """Nesting depth of lists and dicts, without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            stack.extend((child, depth + 1) for child in children)
    return deepest
