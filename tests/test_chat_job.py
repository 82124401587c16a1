"""Tests for the built-in LLM job's data: shipped, valid chats, disjoint, reproducible."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import date
from pathlib import Path

from lorakit.train.chat_job import chat_job_files
from lorakit.train.data import read_records, validate_records

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_llm_data.py"
SYSTEM = "Convert the date to YYYY-MM-DD. Answer with the date only."


def chats(path: Path) -> list[list[dict]]:
    """The ``messages`` of every record in ``path``."""
    return [json.loads(line)["messages"] for line in path.read_text("utf-8").splitlines()]


def test_the_files_are_valid_chats_of_the_expected_size():
    train, eval_ = chat_job_files()
    for path, n in ((train, 1600), (eval_, 100)):
        records = read_records(path)
        validate_records(records, "causal-lm", path)
        assert len(records) == n
        for system, user, assistant in chats(path):
            assert (system["role"], user["role"], assistant["role"]) == (
                "system",
                "user",
                "assistant",
            )
            assert system["content"] == SYSTEM
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", assistant["content"])
            date.fromisoformat(assistant["content"])  # a real date


def test_train_and_eval_share_no_date_and_no_question():
    train, eval_ = (chats(path) for path in chat_job_files())
    assert not {c[1]["content"] for c in train} & {c[1]["content"] for c in eval_}
    assert not {c[2]["content"] for c in train} & {c[2]["content"] for c in eval_}
    assert len({c[2]["content"] for c in train}) == len(train)  # no date twice


def test_the_styles_are_varied():
    train = chats(chat_job_files()[0])
    questions = [c[1]["content"] for c in train]
    assert sum("(day first)" in q for q in questions) > 50
    assert sum("(month first)" in q for q in questions) > 50
    assert sum(bool(re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", q)) for q in questions) > 50


def test_the_script_rewrites_identical_bytes(tmp_path):
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True
    )
    for shipped in chat_job_files():
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
