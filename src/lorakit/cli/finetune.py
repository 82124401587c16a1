"""`lorakit finetune`: a thin shell over `lorakit.train.finetune`.

With no arguments it runs the embedded demo: LoRA on MiniLM-L6 for sentiment of the VADER
lexicon's words; `--recipe chat` runs the built-in LLM job (SmolLM2 learns a date format).
A flag given with a recipe overrides the recipe's value. Under `torchrun -m lorakit finetune
...` it trains with DDP (or FSDP).
"""

from __future__ import annotations

import argparse
from typing import Any, get_args

from ..config import PISSA_NITER, Bias, Init, LoraConfig
from ..train.options import DATA, TRAINING, TrainOptions
from ..train.recipes import RECIPES, recipe
from .dataclass_args import add_arguments, from_args


def _names(value: str) -> tuple[str, ...] | str:
    """ "all-linear" stays a string; "query,value" becomes a tuple of names."""
    if value == "all-linear":
        return value
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _token_ids(value: str) -> list[int]:
    """ "3,7,42" -> [3, 7, 42]: the token ids of --trainable-tokens."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected token ids separated by commas, like 3,7,42; got {value!r}"
        ) from None


class _InitChoices(tuple):
    """The `Init` names, as argparse lists them; "pissa_niter_K" is taken too."""

    def __contains__(self, value: object) -> bool:
        return tuple.__contains__(self, value) or bool(PISSA_NITER.fullmatch(str(value)))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="finetune a local Hugging Face model with LoRA (no arguments: the built-in demo)",
        description=__doc__,
    )
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a whole job by name, its values overridden by the flags given: chat = SmolLM2 "
        "learns to write dates as YYYY-MM-DD",
    )
    add_arguments(p.add_argument_group(DATA), TrainOptions)
    _add_lora_arguments(p.add_argument_group("LoRA (see lorakit.LoraConfig)"))
    training = p.add_argument_group(TRAINING)
    add_arguments(training, TrainOptions)
    # Test hook: every rank saves its trainable tensors to DIR/rank<r>.pt.
    training.add_argument("--debug-dump-params", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _add_lora_arguments(g: argparse._ArgumentGroup) -> None:
    """The LoRA flags: a subset of LoraConfig, some spelled for the command line. A flag not
    given leaves no attribute (see `lora_from_args`)."""
    lora = LoraConfig()

    def add(name: str, help: str = "", **kwargs: Any) -> None:
        g.add_argument(name, default=argparse.SUPPRESS, help=help, **kwargs)

    add("--rank", f"(default: {lora.rank})", type=int)
    add("--alpha", f"(default: {lora.alpha})", type=float)
    add("--dropout", f"(default: {lora.dropout})", type=float)
    add("--targets", '"all-linear" or names: query,value (default: all-linear)', type=_names)
    add("--targets-regex", "one regex over full module paths, instead of --targets")
    add("--exclude", "names never adapted (default: none)", type=_names)
    add("--modules-to-save", "names trained in full (default: a seq-cls model's head)", type=_names)
    add("--use-rslora", "scale by alpha / sqrt(rank)", action="store_true")
    add("--use-dora", "DoRA: a trained magnitude per output row", action="store_true")
    add("--lora-bias", "a trained bias on B (PEFT's lora_bias)", action="store_true")
    add(
        "--trainable-tokens",
        "token ids whose input-embedding rows train: 3,7,42 (PEFT's trainable_token_indices; "
        "a tied lm_head follows)",
        type=_token_ids,
    )
    add("--bias", f"(default: {lora.bias})", choices=get_args(Bias))
    add("--init", f"or pissa_niter_K (default: {lora.init})", choices=_InitChoices(get_args(Init)))
    add(
        "--dtype",
        'adapter dtype; "base" follows the base layer (default: float32)',
        choices=("float32", "float64", "bfloat16", "float16", "base"),
    )


def lora_from_args(args: argparse.Namespace, defaults: dict[str, Any]) -> LoraConfig:
    """The LoraConfig of the LoRA flags given, over `defaults` (a recipe's) and LoraConfig's."""
    given = {k: v for k, v in vars(args).items() if k in _LORA_FLAGS}
    if "targets_regex" in given:
        given["targets"] = given.pop("targets_regex")
    if "trainable_tokens" in given:
        given["trainable_token_indices"] = given.pop("trainable_tokens")
    if given.get("dtype") == "base":
        given["dtype"] = None
    return LoraConfig(**{**defaults, **given})


_LORA_FLAGS = ("rank", "alpha", "dropout", "targets", "targets_regex", "exclude",
               "modules_to_save", "use_rslora", "use_dora", "lora_bias", "bias", "init",
               "dtype", "trainable_tokens")  # fmt: skip


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions, LoraConfig]:
    """The TrainOptions and LoraConfig that parsed arguments describe (validated): the flags
    given, over the recipe's values (`--recipe`), over the defaults."""
    chosen = recipe(args.recipe) if getattr(args, "recipe", None) else None
    options = from_args(TrainOptions, args, chosen.options if chosen else None)
    return options, lora_from_args(args, chosen.lora if chosen else {})


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import finetune

    options, lora = options_from_args(args)
    finetune(options, lora, dump_params=args.debug_dump_params)
    return 0
