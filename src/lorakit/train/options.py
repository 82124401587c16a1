"""`TrainOptions`: every training option of `lorakit finetune`, one frozen dataclass.

The defaults are the command line's, and with `model=None` and `data=None` they describe
the embedded demo job (MiniLM-L6 on the VADER sentiment lexicon). Each field is one flag of
`lorakit finetune`: its help and `--help` group are the field's metadata (see `option`), and
`cli/finetune.py` builds the parser from the fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ..config import check_choice
from ..errors import ConfigError
from .precision import Precision
from .quantize import Optim, Quantize, require_bitsandbytes
from .tokenization import TruncationSide

Task = Literal["seq-cls", "causal-lm"]
Schedule = Literal["linear", "cosine", "constant"]
Progress = Literal["auto", "bar", "lines", "none"]
Padding = Literal["longest", "max-length"]
Batching = Literal["by-length", "random", "packed"]

TASKS: tuple[Task, ...] = get_args(Task)

# The `lorakit finetune --help` groups the options fall in (the LoRA group is LoraConfig's).
DATA = "model and data"
TRAINING = "training"


def option(default: Any, help: str, group: str, shown_default: str | None = None) -> Any:
    """A dataclass field that carries its `lorakit finetune` flag's help in its metadata.

    `help` is the flag's text, `group` its `--help` group, and `shown_default` the words that
    stand for a default that is a behaviour rather than a value (e.g. None: "the demo's").
    """
    metadata = {"help": help, "group": group, "shown_default": shown_default}
    return field(default=default, metadata=metadata)


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
        batching: "by-length" builds each micro-batch from examples of similar length
            (`train.length_groups`); "random" as they come in the seeded order; "packed"
            (causal-lm) also groups by length, then packs each micro-batch's examples into
            rows of `max_length`, each example attending only to itself (`train.packing`;
            the loss is the unpacked micro-batch's). All follow from the seed (resume works).
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
        quantize: "none", or load the base's linear layers in 4 bits ("nf4", "fp4") or 8 bits
            ("int8") with bitsandbytes, adapters in float32 (QLoRA; `train.quantize`).
        optim: "adamw" (torch's), "adamw8bit" or "paged_adamw" (bitsandbytes').
        threads: torch intra-op threads; 0: torch's default, except for the built-in demo,
            which uses 1 (its batches are 32 words of ~3 tokens: a second thread gains little
            and, on a machine busy with other work, makes each step several times slower).
    Decoder LLMs (causal-lm):
        gradient_checkpointing: recompute activations in backward (`train.grad_checkpoint`).
        labelled_logits_only: the head and loss run only on labelled positions
            (`train.labelled_loss`; same loss and gradients, less time and memory).
        eval_generate / max_new_tokens: exact match of greedy answers to the first N
            held-out prompts, before and after training (`train.eval_generate`).

    Raises:
        ConfigError: an option is invalid; the message names it.
    """

    model: str | None = option(
        None, "local model folder, or smollm2 (SmolLM2-135M-Instruct)", DATA, "the demo's MiniLM-L6"
    )
    data: str | None = option(None, "training data, .jsonl/.json/.csv", DATA, "the demo's")
    eval_file: str | None = option(None, "held-out data", DATA, "split off --eval-fraction")
    eval_fraction: float = option(0.1, "share of --data held out without --eval-file", DATA)
    task: Task | None = option(None, "", DATA, "from the model config's architectures")
    max_length: int = option(128, "tokens per example, after truncation", DATA)
    padding: Padding = option(
        "longest",
        "longest: pad each batch to its longest example; max-length: pad every batch to "
        "--max-length",
        DATA,
    )
    batching: Batching = option(
        "by-length",
        "by-length: micro-batches of examples of similar length; random: as they come; "
        "packed (causal-lm): by-length, then each micro-batch packed into rows of --max-length",
        DATA,
    )
    truncation_side: TruncationSide = option(
        "right",
        "end cut from examples over --max-length; left keeps a text's end, and the whole "
        "completion of prompt + completion",
        DATA,
    )
    out: str = option("runs/finetune", "output folder", DATA)
    epochs: int = option(3, "", TRAINING)
    max_steps: int = option(0, "> 0 overrides --epochs", TRAINING)
    batch_size: int = option(32, "per process", TRAINING)
    eval_batch_size: int = option(128, "", TRAINING)
    grad_accum: int = option(1, "micro-batches per optimizer step", TRAINING)
    lr: float = option(1e-3, "peak learning rate", TRAINING)
    weight_decay: float = option(0.0, "", TRAINING)
    loraplus_ratio: float = option(
        1.0, "LoRA+: lora_B's learning rate over lora_A's (1: plain LoRA; the paper uses 16)",
        TRAINING,
    )
    warmup_steps: int = option(10, "", TRAINING)
    schedule: Schedule = option("linear", "lr after warmup", TRAINING)
    max_grad_norm: float = option(1.0, "0: no clipping", TRAINING)
    seed: int = option(0, "", TRAINING)
    eval_every: int = option(50, "steps; 0: off", TRAINING)
    log_every: int = option(10, "steps; 0: off", TRAINING)
    save_every: int = option(50, "steps; 0: at the end only", TRAINING)
    keep_checkpoints: int = option(2, "", TRAINING)
    resume: bool = option(False, "continue from the newest checkpoint in --out", TRAINING)
    overwrite: bool = option(
        False,
        "start afresh in an --out that holds an adapter or checkpoints, deleting them",
        TRAINING,
    )
    fsdp: bool = option(False, "shard the base with FSDP2 (torchrun)", TRAINING)
    precision: Precision = option(
        "fp32",
        "bf16: base in bfloat16, forwards under autocast, adapters and heads trained in float32",
        TRAINING,
    )
    quantize: Quantize = option(
        "none",
        "QLoRA: the base's linear layers in 4-bit (nf4, fp4) or 8-bit (int8) bitsandbytes codes",
        TRAINING,
    )
    optim: Optim = option(
        "adamw", "adamw8bit / paged_adamw: bitsandbytes' AdamW (8-bit or paged state)", TRAINING
    )
    threads: int = option(0, "torch threads; 0: torch's choice, 1 for the demo", TRAINING)
    progress: Progress = option("auto", "", TRAINING)
    gradient_checkpointing: bool = option(
        False, "recompute each block's activations in backward: less memory, more time", TRAINING
    )
    labelled_logits_only: bool = option(
        True,
        "causal-lm: run the output head and the loss only where there are labels (exact)",
        TRAINING,
    )
    eval_generate: int = option(
        0,
        "causal-lm: greedy answers to N held-out prompts before and after training, scored "
        "by exact match; 0: off",
        TRAINING,
    )
    max_new_tokens: int = option(32, "tokens generated per --eval-generate answer", TRAINING)

    def __post_init__(self) -> None:
        if self.task is not None:
            check_choice(self.task, "task", TASKS)
        check_choice(self.schedule, "schedule", get_args(Schedule))
        check_choice(self.progress, "progress", get_args(Progress))
        check_choice(self.padding, "padding", get_args(Padding))
        check_choice(self.batching, "batching", get_args(Batching))
        check_choice(self.truncation_side, "truncation_side", get_args(TruncationSide))
        check_choice(self.precision, "precision", get_args(Precision))
        self._check_bitsandbytes()
        if self.precision == "bf16" and self.fsdp:
            raise ConfigError(
                "precision='bf16' with fsdp is not supported: an FSDP2 shard holds one "
                "parameter dtype, and bf16 mixes a bfloat16 base with float32 adapters; use "
                "DDP (no --fsdp) or precision='fp32'"
            )
        if self.eval_generate and self.fsdp:
            raise ConfigError(
                "eval_generate with fsdp is not supported: generation runs on rank 0 with the "
                "whole model; use DDP (no --fsdp)"
            )
        if not 0.0 < self.eval_fraction < 1.0 or isinstance(self.eval_fraction, bool):
            raise ConfigError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        positive = ("max_length", "epochs", "batch_size", "eval_batch_size", "grad_accum")
        for name in (*positive, "max_new_tokens"):
            _positive_int(getattr(self, name), name)
        for name in ("max_steps", "warmup_steps", "eval_every", "log_every", "save_every"):
            _positive_int(getattr(self, name), name, allow_zero=True)
        for name in ("keep_checkpoints", "threads", "seed", "eval_generate"):
            _positive_int(getattr(self, name), name, allow_zero=True)
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if _number(self.lr, "lr", 0.0) == 0.0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        _number(self.weight_decay, "weight_decay", 0.0)
        _number(self.loraplus_ratio, "loraplus_ratio", 1e-12)
        _number(self.max_grad_norm, "max_grad_norm", 0.0)
        if not self.out:
            raise ConfigError("out must name a folder, got ''")
        if self.resume and self.overwrite:
            raise ConfigError(
                "resume and overwrite exclude each other: resume continues the run in out, "
                "overwrite replaces it"
            )

    def _check_bitsandbytes(self) -> None:
        """The QLoRA options: valid, possible together, and bitsandbytes installed."""
        check_choice(self.quantize, "quantize", get_args(Quantize))
        check_choice(self.optim, "optim", get_args(Optim))
        if self.quantize != "none" and self.fsdp:
            raise ConfigError(
                f"quantize={self.quantize!r} with fsdp is not supported: FSDP2 shards float "
                "parameters, not bitsandbytes' packed codes; use DDP (no --fsdp)"
            )
        for name in ("quantize", "optim"):
            value = getattr(self, name)
            if value not in ("none", "adamw"):
                require_bitsandbytes(f"{name}={value!r}")
