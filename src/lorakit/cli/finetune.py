"""`lorakit finetune`: a thin shell over `lorakit.train.finetune`.

With no arguments it runs the embedded demo: LoRA on MiniLM-L6 for sentiment of the VADER
lexicon's words. Under `torchrun -m lorakit finetune ...` it trains with DDP (or FSDP).
"""

from __future__ import annotations

import argparse

from ..config import LoraConfig
from ..train.data import TRUNCATION_SIDES
from ..train.options import PADDINGS, PROGRESS, SCHEDULES, TASKS, TrainOptions
from ..train.precision import PRECISIONS


def _names(value: str) -> tuple[str, ...] | str:
    """ "all-linear" stays a string; "query,value" becomes a tuple of names."""
    if value == "all-linear":
        return value
    return tuple(v.strip() for v in value.split(",") if v.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainOptions()
    lora = LoraConfig()
    # Every help string names its default once, by hand: ArgumentDefaultsHelpFormatter
    # would print "(default: None)" for options whose default is a behaviour, not a value.
    p = subparsers.add_parser(
        "finetune",
        help="finetune a local Hugging Face model with LoRA (no arguments: the built-in demo)",
        description=__doc__,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="local model folder (default: the demo's MiniLM-L6)")
    g.add_argument("--data", help="training data, .jsonl/.json/.csv (default: the demo's)")
    g.add_argument("--eval-file", help="held-out data (default: split off --eval-fraction)")
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="share of --data held out without --eval-file (default: %(default)s)",
    )
    g.add_argument("--task", choices=TASKS, help="(default: from the model config's architectures)")
    g.add_argument(
        "--max-length",
        type=int,
        default=d.max_length,
        help="tokens per example, after truncation (default: %(default)s)",
    )
    g.add_argument(
        "--padding",
        choices=PADDINGS,
        default=d.padding,
        help="longest: pad each batch to its longest example; max-length: pad every batch "
        "to --max-length (default: %(default)s)",
    )
    g.add_argument(
        "--truncation-side",
        choices=TRUNCATION_SIDES,
        default=d.truncation_side,
        help="end cut from examples over --max-length; left keeps a text's end, and the "
        "whole completion of prompt + completion (default: %(default)s)",
    )
    g.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")

    g = p.add_argument_group("LoRA (see lorakit.LoraConfig)")
    g.add_argument("--rank", type=int, default=lora.rank, help="(default: %(default)s)")
    g.add_argument("--alpha", type=float, default=lora.alpha, help="(default: %(default)s)")
    g.add_argument("--dropout", type=float, default=lora.dropout, help="(default: %(default)s)")
    g.add_argument(
        "--targets",
        type=_names,
        default="all-linear",
        help='"all-linear" or names: query,value (default: %(default)s)',
    )
    g.add_argument("--targets-regex", help="one regex over full module paths, instead of --targets")
    g.add_argument("--exclude", type=_names, default=(), help="names never adapted (default: none)")
    g.add_argument(
        "--modules-to-save",
        type=_names,
        default=(),
        help="names trained in full (default: a seq-cls model's head)",
    )
    g.add_argument("--use-rslora", action="store_true", help="scale by alpha / sqrt(rank)")
    g.add_argument(
        "--bias", choices=("none", "all", "lora_only"), default=lora.bias,
        help="(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--init", choices=("kaiming", "gaussian", "zeros"), default=lora.init,
        help="(default: %(default)s)",
    )  # fmt: skip
    g.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16", "float16", "base"),
        default="float32",
        help='adapter dtype; "base" follows the base layer (default: %(default)s)',
    )

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    g.add_argument(
        "--max-steps",
        type=int,
        default=d.max_steps,
        help="> 0 overrides --epochs (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="per process (default: %(default)s)"
    )
    g.add_argument(
        "--eval-batch-size", type=int, default=d.eval_batch_size, help="(default: %(default)s)"
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per optimizer step (default: %(default)s)",
    )
    g.add_argument(
        "--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)"
    )
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)"
    )
    g.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="(default: %(default)s)"
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=d.schedule,
        help="lr after warmup (default: %(default)s)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm,
        help="0: no clipping (default: %(default)s)",
    )
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    g.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="steps; 0: off (default: %(default)s)"
    )
    g.add_argument(
        "--log-every", type=int, default=d.log_every, help="steps; 0: off (default: %(default)s)"
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help="steps; 0: at the end only (default: %(default)s)",
    )
    g.add_argument(
        "--keep-checkpoints", type=int, default=d.keep_checkpoints, help="(default: %(default)s)"
    )
    g.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds an adapter or checkpoints, deleting them",
    )
    g.add_argument("--fsdp", action="store_true", help="shard the base with FSDP2 (torchrun)")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="bf16: base in bfloat16, forwards under autocast, adapters and heads trained "
        "in float32 (default: %(default)s)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="torch threads; 0: torch's choice, 1 for the demo (default: %(default)s)",
    )
    g.add_argument(
        "--progress", choices=PROGRESS, default=d.progress, help="(default: %(default)s)"
    )
    # Test hook: every rank saves its trainable tensors to DIR/rank<r>.pt.
    g.add_argument("--debug-dump-params", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions, LoraConfig]:
    """The TrainOptions and LoraConfig that parsed arguments describe (validated)."""
    options = TrainOptions(
        model=args.model,
        data=args.data,
        eval_file=args.eval_file,
        eval_fraction=args.eval_fraction,
        task=args.task,
        out=args.out,
        max_length=args.max_length,
        padding=args.padding,
        truncation_side=args.truncation_side,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        eval_every=args.eval_every,
        log_every=args.log_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        overwrite=args.overwrite,
        fsdp=args.fsdp,
        precision=args.precision,
        threads=args.threads,
        progress=args.progress,
    )
    lora = LoraConfig(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        targets=args.targets_regex or args.targets,
        exclude=args.exclude,
        use_rslora=args.use_rslora,
        bias=args.bias,
        modules_to_save=args.modules_to_save,
        init=args.init,
        dtype=None if args.dtype == "base" else args.dtype,
    )
    return options, lora


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import finetune

    options, lora = options_from_args(args)
    finetune(options, lora, dump_params=args.debug_dump_params)
    return 0
