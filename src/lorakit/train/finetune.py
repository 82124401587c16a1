"""`finetune`: the whole job behind `lorakit finetune`, from a model folder and a data file to
an adapter, metrics, a plot and a summary. Every option is checked before training starts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.atomic import atomic_folder
from ..config import LoraConfig
from ..errors import ConfigError, LorakitError
from ..inject import inject
from ..overview import InjectionReport
from .data import (
    CausalLMDataset,
    Collator,
    SeqClsDataset,
    build_label_map,
    pad_token_id,
    read_records,
    split_eval,
    validate_records,
)
from .distributed import DistEnv, barrier, broadcast_object, setup, teardown
from .evaluate import METRIC, majority_accuracy
from .loop import TrainResult, train
from .model import infer_task, load_model, load_tokenizer, read_model_config
from .options import Task, TrainOptions
from .out_folder import check_out
from .precision import load_dtype, upcast
from .report import plot, table
from .state import trainable_state

ADAPTER_DIR = "adapter"
RUN_FILE = "run.json"
# Classification heads of transformers models, trained in full next to the adapter.
HEAD_NAMES = ("classifier", "score")
DEMO_THREADS = 1  # see TrainOptions.threads


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


# The command line's LoRA defaults: rank 8, alpha 16 on every linear layer (plus the head).
DEFAULT_LORA = LoraConfig(rank=8, alpha=16.0, targets="all-linear")


def finetune(
    options: TrainOptions | None = None,
    lora: LoraConfig | None = None,
    *,
    dump_params: str | None = None,
) -> FinetuneResult | None:
    """Finetune a local Hugging Face model with LoRA; returns the result on rank 0.

    With default options: the embedded demo (MiniLM-L6, VADER sentiment words, seq-cls).
    Under torchrun each rank calls this; ranks other than 0 return None.
    `dump_params` (for tests): each rank saves its trainable tensors to `<dir>/rank<r>.pt`.

    Raises:
        ConfigError: a bad option, model folder or task, before training starts; an `out`
            that is a file or not writable, or that holds an earlier run (an adapter or
            checkpoints) while neither `resume` nor `overwrite` is set.
        CheckpointError: `resume` with no checkpoint in `out`, or one that cannot be read.
        DataError: bad data, naming the file, line and field.
        TrainingError: the loss became NaN or inf.
    """
    options = options or TrainOptions()
    threads = options.threads or (DEMO_THREADS if options.model is None else 0)
    if threads:
        torch.set_num_threads(threads)
    env = setup()
    try:
        return _finetune(options, lora, env, dump_params)
    finally:
        teardown(env)


def _finetune(
    options: TrainOptions, lora: LoraConfig | None, env: DistEnv, dump_params: str | None
) -> FinetuneResult | None:
    out = Path(options.out)
    _check_out(options, env)  # before anything is written (the demo writes out/data)
    model_dir, data_file, eval_file, task = _resolve_inputs(options, env)
    tokenizer = load_tokenizer(model_dir)
    train_records = read_records(data_file)
    validate_records(train_records, task, data_file)
    if eval_file is not None:
        eval_records = read_records(eval_file)
        validate_records(eval_records, task, eval_file)
    else:
        train_records, eval_records = split_eval(train_records, options.eval_fraction, options.seed)
        eval_file = data_file
    label_map = build_label_map(train_records, data_file) if task == "seq-cls" else None
    n, side = options.max_length, options.truncation_side
    if task == "seq-cls":
        train_data = SeqClsDataset(train_records, tokenizer, label_map, n, data_file, side)
        eval_data = SeqClsDataset(eval_records, tokenizer, label_map, n, eval_file, side)
    else:
        train_data = CausalLMDataset(train_records, tokenizer, n, data_file, side)
        eval_data = CausalLMDataset(eval_records, tokenizer, n, eval_file, side)
    pad = pad_token_id(tokenizer)
    collator = Collator(pad, pad_to=n if options.padding == "max-length" else None)

    torch.manual_seed(options.seed)  # the head's and the adapter's initial values
    model = load_model(model_dir, task, label_map, load_dtype(options.precision))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad  # seq-cls heads find the last real token with it
    lora = lora or DEFAULT_LORA
    if task == "seq-cls" and not lora.modules_to_save:
        lora = _with_head(lora, model)
    report = inject(model, lora)
    if options.precision == "bf16":
        upcast([model.get_submodule(path) for path in report.modules_to_save])

    result = train(model, train_data, eval_data, options, task=task, collate_fn=collator, env=env)
    if dump_params:
        Path(dump_params).mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(model, options.fsdp), Path(dump_params) / f"rank{env.rank}.pt")
    barrier(env)
    if not env.is_main:
        return None

    adapter = _publish_adapter(result.checkpoint, out / ADAPTER_DIR)
    baseline = None
    if task == "seq-cls":
        train_labels = [ex["labels"] for ex in train_data.examples]
        baseline = majority_accuracy(train_labels, [ex["labels"] for ex in eval_data.examples])
    run_info = {
        "model": str(model_dir),
        "task": task,
        "data": str(data_file),
        "eval_file": str(eval_file),
        "labels": label_map,
        "options": asdict(options),
        "lora": {k: v for k, v in asdict(lora).items() if k != "dtype"},
        "world_size": env.world_size,
        "steps": result.steps,
        "seconds": result.seconds,
        "train_seconds": result.train_seconds,
        "tokens": result.tokens,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "majority_baseline": baseline,
    }
    (out / RUN_FILE).write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    drawn = plot(out, METRIC[task])
    summary = _summary(
        options, task, report, result, baseline, len(train_data), len(eval_data), env, drawn
    )
    print(summary, flush=True)
    return FinetuneResult(
        out=out,
        adapter=adapter,
        task=task,
        model=model,
        report=report,
        train=result,
        baseline=baseline,
        n_train=len(train_data),
        n_eval=len(eval_data),
        summary=summary,
    )


def _check_out(options: TrainOptions, env: DistEnv) -> None:
    """`check_out` on rank 0, its error raised on every rank (none waits for a failed one)."""
    error: LorakitError | None = None
    if env.is_main:
        try:
            check_out(options.out, options.resume, options.overwrite)
        except LorakitError as err:
            error = err
    error = broadcast_object(env, error)
    if error is not None:
        raise error


def _resolve_inputs(options: TrainOptions, env: DistEnv) -> tuple[Path, Path, Path | None, Task]:
    """Model folder, data file(s) and task; the demo's when none are given."""
    from .demo_data import demo_dataset, demo_model_path

    model_dir = Path(options.model or demo_model_path())
    config = read_model_config(model_dir)
    # The demo model's config names only the bare encoder (BertModel): the demo is seq-cls.
    task = infer_task(config, options.task or (None if options.model else "seq-cls"), model_dir)
    if options.data is not None:
        eval_file = Path(options.eval_file) if options.eval_file else None
        return model_dir, Path(options.data), eval_file, task
    if task != "seq-cls":
        raise ConfigError(f"the demo data is for task 'seq-cls', not {task!r}; pass --data")
    demo_dir = Path(options.out) / "data"
    if env.is_main:
        demo_dataset(demo_dir)
    barrier(env)
    return model_dir, demo_dir / "train.jsonl", demo_dir / "eval.jsonl", task


def _with_head(lora: LoraConfig, model: nn.Module) -> LoraConfig:
    """`lora` with the model's classification head added to `modules_to_save`."""
    import dataclasses

    children = dict(model.named_children())
    heads = tuple(name for name in HEAD_NAMES if name in children)
    return dataclasses.replace(lora, modules_to_save=heads) if heads else lora


def _publish_adapter(checkpoint: Path | None, dest: Path) -> Path:
    """Copy the final checkpoint's adapter to `dest`, replacing any old one whole."""
    assert checkpoint is not None  # train() always ends with a checkpoint
    with atomic_folder(dest) as tmp:
        shutil.copytree(checkpoint / "adapter", tmp, dirs_exist_ok=True)
    return dest


def _summary(
    options: TrainOptions,
    task: Task,
    report: InjectionReport,
    result: TrainResult,
    baseline: float | None,
    n_train: int,
    n_eval: int,
    env: DistEnv,
    drawn: Path | None,
) -> str:
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
    return table([(k, str(v)) for k, v in rows])
