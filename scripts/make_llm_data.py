"""Write the built-in LLM job's data: English dates in varied styles to ISO ``YYYY-MM-DD``.

A small instruct model mostly answers with a sentence, the wrong day/month order, or an
unpadded number; LoRA learns the strict format in minutes. Answers are scored by exact
match. Each record is a chat (``messages``): the fixed system message, the date as the
user turn, the ISO date as the assistant turn. Train and eval dates are disjoint, drawn
with a fixed seed, so rerunning writes identical bytes.

Usage: ``python scripts/make_llm_data.py [--out FOLDER]`` (default
``src/lorakit/llm/data``), writing ``train.jsonl`` and ``eval.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import date, timedelta
from pathlib import Path

SEED = 20250305
N_TRAIN = 1600
N_EVAL = 100
FIRST_DAY = date(1950, 1, 1)
N_DAYS = (date(2049, 12, 31) - FIRST_DAY).days + 1
SYSTEM = "Convert the date to YYYY-MM-DD. Answer with the date only."
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "llm" / "data"


MONTHS = (
    "January February March April May June July August September October November December"
).split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()

STYLES = (
    "{month} {day}, {year}",  # March 5, 2021
    "{nth} of {month} {year}",  # 5th of March 2021
    "{dd}/{mm}/{year} (day first)",  # 05/03/2021 (day first)
    "{mm}/{dd}/{year} (month first)",  # 03/05/2021 (month first)
    "{year}, {month} the {nth}",  # 2021, March the 5th
    "{day} {month} {year}",  # 5 March 2021
    "{mon} {day} {year}",  # Mar 5 2021
    "{month} {nth}, {year}",  # March 5th, 2021
    "{weekday}, {nth} {month} {year}",  # Friday, 5th March 2021
    "the {nth} day of {month}, {year}",  # the 5th day of March, 2021
)
"""Ways to write a date; the numeric ones say which comes first, so none is ambiguous."""


def ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``."""
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def date_fields(d: date) -> dict[str, str]:
    """The parts :data:`STYLES` are written with (English names, whatever the locale)."""
    name = MONTHS[d.month - 1]
    return {
        "year": str(d.year),
        "month": name,
        "mon": name[:3],
        "mm": f"{d.month:02d}",
        "day": str(d.day),
        "dd": f"{d.day:02d}",
        "nth": ordinal(d.day),
        "weekday": WEEKDAYS[d.weekday()],
    }


def record(d: date, rng: random.Random) -> dict:
    """One chat: the date in a random style, answered in ISO form."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": rng.choice(STYLES).format(**date_fields(d))},
            {"role": "assistant", "content": d.isoformat()},
        ]
    }


def make_records() -> tuple[list[dict], list[dict]]:
    """Train and eval records over disjoint dates drawn with :data:`SEED`."""
    rng = random.Random(SEED)
    days = rng.sample(range(N_DAYS), N_TRAIN + N_EVAL)
    dates = [FIRST_DAY + timedelta(days=n) for n in days]
    records = [record(d, rng) for d in dates]
    return records[:N_TRAIN], records[N_TRAIN:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line, UTF-8, ``\\n`` line ends."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes(lines.encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write into")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    train, eval_ = make_records()
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", eval_)
    print(f"wrote {len(train)} train and {len(eval_)} eval records to {out}")


if __name__ == "__main__":
    main()
