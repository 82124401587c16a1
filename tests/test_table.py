"""table_lines: the column layout shared by `lorakit.summary` and `lorakit inspect`."""

from __future__ import annotations

from lorakit.table import table_lines


def test_columns_are_padded_to_the_widest_cell_two_spaces_apart():
    rows = [("module", "rank", "merged"), ("layers.0.q_proj", "8", "no"), ("fc", "16", "yes")]
    assert table_lines(rows) == [
        "module           rank  merged",
        "layers.0.q_proj  8     no    ",
        "fc               16    yes   ",
    ]


def test_a_header_alone_is_one_line():
    assert table_lines([("module", "rank")]) == ["module  rank"]
