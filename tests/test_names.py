"""name_matches: the one module-name rule behind targets, exclude, modules_to_save and patterns."""

from __future__ import annotations

import pytest

from lorakit.config import pattern_key
from lorakit.names import name_matches


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("layers.0.q_proj", ("q_proj",), True),  # a name selects a path's end after "."
        ("q_proj", ("q_proj",), True),  # or the whole path
        ("layers.0.xq_proj", ("q_proj",), False),  # never part of a component
        ("layers.0.q_proj.base", ("q_proj",), False),  # nor a path's middle
        ("layers.0.q_proj", ("0.q_proj", "v_proj"), True),  # dotted names, any of several
        ("layers.0.q_proj", (), False),
        ("layers.0.q_proj", r".*\.q_proj", True),  # a str is a regex on the whole path
        ("layers.0.q_proj", "q_proj", False),  # so a bare str name is not a suffix
        ("layers.0.q_proj", r"layers\.0", False),
        ("", "", False),  # "" selects nothing, not even the root's empty path
        ("", (), False),
    ],
)
def test_name_matches(name, patterns, expected):
    assert name_matches(name, patterns) is expected


def test_pattern_keys_are_regexes_matched_as_a_suffix():
    patterns = {r"q_proj": 1, r"layers\.[12]\.v_proj": 2, "k": 3}
    assert pattern_key(patterns, "model.layers.0.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.2.v_proj") == r"layers\.[12]\.v_proj"
    assert pattern_key(patterns, "model.layers.3.v_proj") is None
    assert pattern_key(patterns, "model.layers.0.xk") is None
