"""`lorakit finetune`: a thin shell over `lorakit.train.finetune`.

With no arguments it runs the embedded demo: LoRA on MiniLM-L6 for sentiment of the VADER
lexicon's words. Under `torchrun -m lorakit finetune ...` it trains with DDP (or FSDP).
"""

from __future__ import annotations

import argparse
from typing import get_args

from ..config import Bias, Init, LoraConfig
from ..train.options import DATA, TRAINING, TrainOptions
from .dataclass_args import add_arguments, from_args


def _names(value: str) -> tuple[str, ...] | str:
    """ "all-linear" stays a string; "query,value" becomes a tuple of names."""
    if value == "all-linear":
        return value
    return tuple(v.strip() for v in value.split(",") if v.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="finetune a local Hugging Face model with LoRA (no arguments: the built-in demo)",
        description=__doc__,
    )
    add_arguments(p.add_argument_group(DATA), TrainOptions)
    _add_lora_arguments(p.add_argument_group("LoRA (see lorakit.LoraConfig)"))
    training = p.add_argument_group(TRAINING)
    add_arguments(training, TrainOptions)
    # Test hook: every rank saves its trainable tensors to DIR/rank<r>.pt.
    training.add_argument("--debug-dump-params", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _add_lora_arguments(g: argparse._ArgumentGroup) -> None:
    """The LoRA flags: a subset of LoraConfig, some spelled for the command line."""
    lora = LoraConfig()
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
        "--bias", choices=get_args(Bias), default=lora.bias, help="(default: %(default)s)"
    )
    g.add_argument(
        "--init", choices=get_args(Init), default=lora.init, help="(default: %(default)s)"
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64", "bfloat16", "float16", "base"),
        default="float32",
        help='adapter dtype; "base" follows the base layer (default: %(default)s)',
    )


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions, LoraConfig]:
    """The TrainOptions and LoraConfig that parsed arguments describe (validated)."""
    options = from_args(TrainOptions, args)
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
