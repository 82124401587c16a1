"""`TrainOptions`: every training option of `lorakit finetune`, one frozen dataclass.

The defaults are the command line's, and with `model=None` and `data=None` they describe
the embedded demo job (MiniLM-L6 on the VADER sentiment lexicon).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..config import check_choice
from ..errors import ConfigError
from .data import TRUNCATION_SIDES, TruncationSide
from .precision import PRECISIONS, Precision

Task = Literal["seq-cls", "causal-lm"]
Schedule = Literal["linear", "cosine", "constant"]
Progress = Literal["auto", "bar", "lines", "none"]
Padding = Literal["longest", "max-length"]

TASKS = ("seq-cls", "causal-lm")
SCHEDULES = ("linear", "cosine", "constant")
PROGRESS = ("auto", "bar", "lines", "none")
PADDINGS = ("longest", "max-length")


def _positive_int(value: object, option: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a non-negative" if allow_zero else "a positive"
        raise ConfigError(f"{option} must be {kind} integer, got {value!r}")
    return value


def _number(value: object, option: str, low: float, high: float = math.inf) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{option} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TrainOptions:
    """Options of one finetuning run, validated in `__post_init__`.

    Data and model:
        model: a local Hugging Face model folder (None: the demo's MiniLM-L6).
        data: training file, .jsonl/.json/.csv (None: the demo's VADER lexicon split).
        eval_file: held-out file; without it `eval_fraction` of `data` is held out.
        task: "seq-cls" | "causal-lm"; None infers it from the config's `architectures`.
        max_length: tokens per example after truncation.
        padding: "longest" pads each batch to its longest example; "max-length" pads
            every batch to `max_length` (fixed shapes).
        truncation_side: "right" cuts an over-long example's end, "left" its start (for
            prompt + completion: the prompt's start, keeping the whole completion).
    Optimisation (AdamW; lr warms up linearly for `warmup_steps`, then follows `schedule`
    down to 0 at the last step):
        epochs / max_steps: `max_steps` > 0 wins over `epochs`.
        batch_size: examples per process per micro-batch; the global batch is
            batch_size x grad_accum x world size.
        max_grad_norm: clip the global grad norm (0 disables).
    Bookkeeping:
        eval_every / log_every / save_every: in optimizer steps (0 disables; eval also
            runs before training and at the end, a checkpoint is written at the end).
        keep_checkpoints: how many recent checkpoints stay on disk.
        resume: continue from the newest checkpoint in `out` (an error if it has none).
        overwrite: start afresh in an `out` that already holds an adapter or checkpoints,
            deleting them; without it (or `resume`) such an `out` is refused.
        fsdp: shard the base with FSDP2 `fully_shard` (needs torchrun).
        precision: "fp32", or "bf16": the base loaded in bfloat16 and every forward under
            autocast, adapters and modules_to_save kept in float32 (`train.precision`).
        threads: torch intra-op threads; 0: torch's default, except for the built-in demo,
            which uses 1 (its batches are 32 words of ~3 tokens: a second thread gains little
            and, on a machine busy with other work, makes each step several times slower).

    Raises:
        ConfigError: an option is invalid; the message names it.
    """

    model: str | None = None
    data: str | None = None
    eval_file: str | None = None
    eval_fraction: float = 0.1
    task: Task | None = None
    out: str = "runs/finetune"
    max_length: int = 128
    padding: Padding = "longest"
    truncation_side: TruncationSide = "right"
    epochs: int = 3
    max_steps: int = 0
    batch_size: int = 32
    eval_batch_size: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: Schedule = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 50
    log_every: int = 10
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    fsdp: bool = False
    precision: Precision = "fp32"
    threads: int = 0
    progress: Progress = "auto"

    def __post_init__(self) -> None:
        if self.task is not None:
            check_choice(self.task, "task", TASKS)
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_choice(self.progress, "progress", PROGRESS)
        check_choice(self.padding, "padding", PADDINGS)
        check_choice(self.truncation_side, "truncation_side", TRUNCATION_SIDES)
        check_choice(self.precision, "precision", PRECISIONS)
        if self.precision == "bf16" and self.fsdp:
            raise ConfigError(
                "precision='bf16' with fsdp is not supported: an FSDP2 shard holds one "
                "parameter dtype, and bf16 mixes a bfloat16 base with float32 adapters; use "
                "DDP (no --fsdp) or precision='fp32'"
            )
        if not 0.0 < self.eval_fraction < 1.0 or isinstance(self.eval_fraction, bool):
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        for name in ("max_length", "epochs", "batch_size", "eval_batch_size", "grad_accum"):
            _positive_int(getattr(self, name), name)
        for name in ("max_steps", "warmup_steps", "eval_every", "log_every", "save_every"):
            _positive_int(getattr(self, name), name, allow_zero=True)
        for name in ("keep_checkpoints", "threads", "seed"):
            _positive_int(getattr(self, name), name, allow_zero=True)
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if _number(self.lr, "lr", 0.0) == 0.0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        _number(self.weight_decay, "weight_decay", 0.0)
        _number(self.max_grad_norm, "max_grad_norm", 0.0)
        if not self.out:
            raise ConfigError("out must name a folder, got ''")
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues the run in out, "
                "overwrite replaces it"
            )
