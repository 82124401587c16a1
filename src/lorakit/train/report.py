"""What a run tells its user: metrics.jsonl, progress (bar or log lines), a plot, a summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..checkpoint.atomic import atomic_write

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per logged step and per evaluation.

    On resume, lines logged after the checkpoint's step (by the run that crashed) are
    dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, out: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(out) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, text.encode("utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        append_metrics(self.path.parent, record)


def append_metrics(out: str | Path, record: dict[str, Any]) -> None:
    """Append one record to `out`/metrics.jsonl."""
    with open(Path(out) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; plain log lines otherwise.

    mode: "auto" (bar when stderr is a TTY), "bar", "lines" or "none".
    """

    def __init__(self, total: int, start: int, mode: str = "auto", stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.total = total
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        if mode == "bar":
            self.bar = _tqdm_bar(total, start, self.stream)
            if self.bar is None:
                self.mode = "lines"

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        """One optimizer step done (the bar moves; lines print only via `log`)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")

    def log_step(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if self.mode != "lines":
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        self.print(
            f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  eta {eta:.0f}s"
        )

    def print(self, line: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_bar(total: int, start: int, stream: TextIO) -> Any:
    """A tqdm progress bar, or None (log lines instead) when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", file=stream)


def plot(out: str | Path, metric: str) -> Path | None:
    """PNG of training loss and eval `metric` against steps, from `out/metrics.jsonl`.

    Without matplotlib (an optional dependency) it prints a one-line notice and returns None:
    a finished run must not end in an ImportError.
    """
    try:
        import matplotlib
    except ImportError:
        print(
            f"lorakit: matplotlib is not installed, so no {PLOT_FILE} was drawn "
            "(pip install 'lorakit[train]'); the metrics are in " + str(Path(out) / METRICS_FILE),
            file=sys.stderr,
            flush=True,
        )
        return None

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    records = read_metrics(Path(out) / METRICS_FILE)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "eval" not in r]
    evals = [(r["step"], r["eval"][metric]) for r in records if metric in r.get("eval", {})]
    if not train and not evals:
        return None
    fig, left = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        left.plot(*zip(*train), color="tab:blue", label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("training loss", color="tab:blue")
    if evals:
        right = left.twinx()
        right.plot(*zip(*evals), "o-", color="tab:orange", label=f"eval {metric}")
        right.set_ylabel(f"eval {metric}", color="tab:orange")
    fig.suptitle(f"lorakit finetune: training loss and eval {metric}")
    fig.tight_layout()
    path = Path(out) / PLOT_FILE
    fig.savefig(path)
    plt.close(fig)
    return path


def table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table."""
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])
