"""Where a training run reports: metrics.jsonl (rank 0) and the progress bar or lines."""

from __future__ import annotations

from dataclasses import dataclass

from .report import MetricsLog, Progress
from .run import Run


@dataclass
class RunReport:
    """metrics.jsonl (None on ranks other than 0) and the progress display."""

    log: MetricsLog | None
    progress: Progress


def open_report(run: Run, resumed_at: int | None) -> RunReport:
    """A fresh run's empty metrics.jsonl, or a resumed one's cut back to step `resumed_at`."""
    log = MetricsLog(run.out, resumed_at) if run.env.is_main else None
    mode = run.options.progress if run.env.is_main else "none"
    return RunReport(log, Progress(run.total, resumed_at or 0, mode))


def report_eval(report: RunReport, step: int, metrics: dict[str, float], title: str) -> None:
    """Print `title` and `metrics` and log them at `step`; nothing when there are none."""
    if not metrics:
        return
    report.progress.print(f"{title} {format_metrics(metrics)}")
    if report.log:
        report.log.write({"step": step, "eval": metrics})


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
