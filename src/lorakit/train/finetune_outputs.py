"""What a finished `finetune` leaves: the adapter folder, run.json, the plot, the summary
table, and the result it returns (`FinetuneResult`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..checkpoint.atomic import atomic_folder
from ..checkpoint.base_model import restamp_base
from ..overview import InjectionReport
from .distributed import DistEnv
from .eval_generate import GenerationScore
from .evaluate import METRIC, majority_accuracy
from .finetune_data import FinetuneData
from .finetune_inputs import FinetuneInputs
from .finetune_model import AdaptedModel
from .loop import TrainResult
from .options import Task, TrainOptions
from .report import append_metrics, plot, table

Scores = tuple["GenerationScore | None", "GenerationScore | None"]
ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"


@dataclass
class FinetuneResult:
    """A finished `finetune`: the adapter's folder, the trained model, and how well it did."""

    out: Path
    adapter: Path
    task: Task
    model: nn.Module
    report: InjectionReport
    train: TrainResult
    baseline: float | None
    n_train: int
    n_eval: int
    summary: str


def write_outputs(
    options: TrainOptions,
    env: DistEnv,
    inputs: FinetuneInputs,
    data: FinetuneData,
    adapted: AdaptedModel,
    result: TrainResult,
    generation: Scores = (None, None),
) -> FinetuneResult:
    """Publish the final adapter, write run.json and the plot, print the summary (rank 0).
    `generation`: exact match of generated answers before and after training (or None)."""
    out, task = Path(options.out), inputs.task
    adapter = _publish_adapter(result.checkpoint, out / ADAPTER_DIR, options.model)
    baseline = None
    if task == "seq-cls":
        train_labels = [ex["labels"] for ex in data.train.examples]
        baseline = majority_accuracy(train_labels, [ex["labels"] for ex in data.eval.examples])
    run_info = _run_info(options, env, inputs, data, adapted, result, baseline)
    run_info["eval_generate"] = _log_generation(out, generation, result.steps)
    (out / RUN_FILE).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    drawn = plot(out, METRIC[task])
    n_train, n_eval = len(data.train), len(data.eval)
    rows = _summary_rows(
        options, task, adapted.report, result, baseline, n_train, n_eval, env, drawn
    )
    summary = table(rows + generation_rows(generation))
    print(summary, flush=True)
    return FinetuneResult(
        out=out,
        adapter=adapter,
        task=task,
        model=adapted.model,
        report=adapted.report,
        train=result,
        baseline=baseline,
        n_train=n_train,
        n_eval=n_eval,
        summary=summary,
    )


def _publish_adapter(checkpoint: Path | None, dest: Path, model: str | None) -> Path:
    """Copy the final checkpoint's adapter to `dest`, replacing any old one whole, with
    `model` as its base as the user named it (--model: a folder as given, or the "smollm2"
    alias; None for the built-in demo's model, which lives inside the installed package)."""
    assert checkpoint is not None  # train() always ends with a checkpoint
    with atomic_folder(dest) as tmp:
        shutil.copytree(checkpoint / "adapter", tmp, dirs_exist_ok=True)
        restamp_base(tmp, model)
    return dest


def _log_generation(out: Path, generation: Scores, steps: int) -> dict[str, Any] | None:
    """Append the exact-match scores to metrics.jsonl; their run.json entry (None if off)."""
    before, after = generation
    if before is None and after is None:
        return None
    entry = {}
    for when, score, step in (("before", before, 0), ("after", after, steps)):
        if score is not None:
            entry[when] = asdict(score)
            record = {"step": step, "event": f"eval_generate {when}"}
            append_metrics(out, {**record, "exact_match": score.exact_match, "n": score.n})
    return entry


def generation_rows(generation: Scores) -> list[tuple[str, str]]:
    """Summary rows: exact match before -> after, and the first answers side by side."""
    before, after = generation
    if after is None:
        return []
    was = f"{before.exact_match:.2f} before -> " if before is not None else ""
    rows = [("exact match", f"{was}{after.exact_match:.2f} after ({after.n} held-out prompts)")]
    for i, answer in enumerate(after.examples):
        then = f"before {before.examples[i].answer.strip()!r}, " if before is not None else ""
        rows.append((
            f"example {i + 1}",
            f"{answer.question!r}: {then}after {answer.answer.strip()!r} "
            f"(expected {answer.reference!r})",
        ))  # fmt: skip
    return rows


def _run_info(
    options: TrainOptions,
    env: DistEnv,
    inputs: FinetuneInputs,
    data: FinetuneData,
    adapted: AdaptedModel,
    result: TrainResult,
    baseline: float | None,
) -> dict[str, Any]:
    """run.json: what was trained on what, with which options, and how it went."""
    return {
        "model": str(inputs.model_dir),
        "task": inputs.task,
        "data": str(inputs.data_file),
        "eval_file": str(data.eval_file),
        "labels": data.label_map,
        "options": asdict(options),
        "lora": {k: v for k, v in asdict(adapted.lora).items() if k != "dtype"},
        "world_size": env.world_size,
        "steps": result.steps,
        "seconds": result.seconds,
        "train_seconds": result.train_seconds,
        "tokens": result.tokens,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "majority_baseline": baseline,
    }


def _summary_rows(
    options: TrainOptions,
    task: Task,
    report: InjectionReport,
    result: TrainResult,
    baseline: float | None,
    n_train: int,
    n_eval: int,
    env: DistEnv,
    drawn: Path | None,
) -> list[tuple[str, str]]:
    """The summary's rows: what was trained, how long it took, and how it went."""
    share = 100.0 * report.trainable / report.total if report.total else 0.0
    batch = options.batch_size * options.grad_accum * env.world_size
    demo = " (VADER lexicon words, built-in demo)" if options.data is None else ""
    rows: list[tuple[str, Any]] = [
        ("model", f"{options.model or 'all-MiniLM-L6-v2 (built-in demo)'} ({task})"),
        ("data", f"{n_train:,} train / {n_eval:,} eval examples{demo}"),
        ("adapted layers", f"{len(report.adapted)} (+ {len(report.modules_to_save)} in full)"),
        ("trainable params", f"{report.trainable:,} of {report.total:,} ({share:.2f}%)"),
        ("steps", f"{result.steps} (global batch {batch}, {env.world_size} process(es))"),
        ("time", f"{result.seconds:.1f} s ({result.train_seconds:.1f} s in training steps)"),
        ("tokens/s", f"{result.tokens_per_s:,.0f}"),
    ]
    for key in result.eval_after:
        before = result.eval_before.get(key, float("nan"))
        rows.append((f"eval {key}", f"{before:.4f} before -> {result.eval_after[key]:.4f} after"))
    if baseline is not None:
        rows.append(("majority baseline", f"{baseline:.4f} accuracy"))
    out = Path(options.out)
    rows += [
        ("adapter", str(out / ADAPTER_DIR)),
        ("metrics / plot", f"{out / 'metrics.jsonl'} / {drawn or 'none (no matplotlib)'}"),
    ]
    return [(k, str(v)) for k, v in rows]
