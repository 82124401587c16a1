"""Which module paths a name pattern selects: PEFT's rule, in one place."""

from __future__ import annotations

import re


def name_matches(name: str, patterns: str | tuple[str, ...]) -> bool:
    """True when the module path `name` is selected by `patterns` (PEFT's rule).

    A str is a regex the whole path must match ("" selects nothing); a tuple holds names,
    each selecting the path itself or a path that ends with "." + it ("q_proj" selects
    "layers.0.q_proj", not "layers.0.xq_proj").
    """
    if isinstance(patterns, str):
        return bool(patterns) and re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)
