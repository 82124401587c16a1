"""What a `finetune` run reads: the model folder, the data file(s) and the task; the
embedded demo's when no model and data are given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..llm.model import SMOLLM2, prepare_model
from .distributed import DistEnv, barrier
from .model import infer_task, read_model_config
from .options import Task, TrainOptions


@dataclass(frozen=True)
class FinetuneInputs:
    """The model folder, the training data, the held-out file (None: split from the data)
    and the task."""

    model_dir: Path
    data_file: Path
    eval_file: Path | None
    task: Task


def resolve_inputs(options: TrainOptions, env: DistEnv) -> FinetuneInputs:
    """Model folder, data file(s) and task; the demo's when none are given (rank 0 writes
    the demo data to `out`/data)."""
    from .demo_data import demo_dataset

    model_dir = _model_dir(options.model, env)
    config = read_model_config(model_dir)
    # The demo model's config names only the bare encoder (BertModel): the demo is seq-cls.
    task = infer_task(config, options.task or (None if options.model else "seq-cls"), model_dir)
    if options.eval_generate and task != "causal-lm":
        raise ConfigError(
            f"eval_generate scores generated answers, which needs task 'causal-lm', not {task!r}"
        )
    if options.data is not None:
        eval_file = Path(options.eval_file) if options.eval_file else None
        return FinetuneInputs(model_dir, Path(options.data), eval_file, task)
    if task != "seq-cls":
        raise ConfigError(f"the demo data is for task 'seq-cls', not {task!r}; pass --data")
    demo_dir = Path(options.out) / "data"
    if env.is_main:
        demo_dataset(demo_dir)
    barrier(env)
    return FinetuneInputs(model_dir, demo_dir / "train.jsonl", demo_dir / "eval.jsonl", task)


def _model_dir(model: str | None, env: DistEnv) -> Path:
    """The folder `--model` names: the demo's MiniLM-L6 (None), lorakit's cached SmolLM2
    ("smollm2", converted by rank 0 on first use), else the folder as given."""
    from .demo_data import demo_model_path

    if model is None:
        return Path(demo_model_path())
    if model != SMOLLM2:
        return Path(model)
    if env.is_main:
        prepare_model()
    barrier(env)
    return prepare_model()  # cached now: only finds the folder
