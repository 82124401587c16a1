"""The built-in LLM job's data: dates in varied English styles to ISO ``YYYY-MM-DD``, as
chats (``messages``) that ship in the package (written by ``scripts/make_llm_data.py``)."""

from __future__ import annotations

from pathlib import Path

DATA_FOLDER = Path(__file__).resolve().parent.parent / "llm" / "data"


def chat_job_files() -> tuple[Path, Path]:
    """The train and eval JSONL files (1,600 and 100 chats, disjoint dates)."""
    return DATA_FOLDER / "train.jsonl", DATA_FOLDER / "eval.jsonl"
