"""`lorakit finetune`'s flags are built from TrainOptions' fields: one flag, help and
group a field, choices from the `Literal` annotations, values back into TrainOptions."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal, get_args

import pytest

from lorakit.cli import build_parser
from lorakit.cli.dataclass_args import add_arguments, flag, from_args, literal_choices
from lorakit.cli.finetune import options_from_args
from lorakit.config import Bias, Init
from lorakit.train import TrainOptions
from lorakit.train.options import Batching, Padding, Progress, Schedule, Task, option
from lorakit.train.precision import Precision
from lorakit.train.quantize import Optim, Quantize
from lorakit.train.tokenization import TruncationSide


def _finetune_parser() -> argparse.ArgumentParser:
    (commands,) = (a for a in build_parser()._actions if a.dest == "command")
    return commands.choices["finetune"]


def _actions() -> dict[str, argparse.Action]:
    """The finetune parser's actions by their (first) flag."""
    return {a.option_strings[0]: a for a in _finetune_parser()._actions if a.option_strings}


def _group_of(flag_name: str) -> str:
    for group in _finetune_parser()._action_groups:
        if any(flag_name in a.option_strings for a in group._group_actions):
            return group.title
    raise AssertionError(f"{flag_name} is in no group")


@pytest.mark.parametrize("field", dataclasses.fields(TrainOptions), ids=lambda f: f.name)
def test_every_field_has_a_flag_with_help_in_its_group(field: dataclasses.Field) -> None:
    action = _actions()[flag(field.name)]
    assert action.dest == field.name
    assert action.help and action.help != argparse.SUPPRESS
    assert "None" not in action.help  # a None default is described in words
    assert _group_of(flag(field.name)) == field.metadata["group"]
    assert action.default == argparse.SUPPRESS  # a flag not given leaves the default to others
    if not isinstance(field.default, bool):
        shown = field.metadata["shown_default"] or str(field.default)
        assert action.help.endswith(f"(default: {shown})")


def test_choices_are_the_literal_annotations_values() -> None:
    literals = {"task": Task, "padding": Padding, "truncation_side": TruncationSide,
                "schedule": Schedule, "precision": Precision, "progress": Progress,
                "batching": Batching, "quantize": Quantize, "optim": Optim}  # fmt: skip
    actions = _actions()
    for name, literal in literals.items():
        assert tuple(actions[flag(name)].choices) == get_args(literal)
    without_choices = [f.name for f in dataclasses.fields(TrainOptions) if f.name not in literals]
    assert all(actions[flag(name)].choices is None for name in without_choices)
    assert tuple(actions["--bias"].choices) == get_args(Bias)
    assert tuple(actions["--init"].choices) == get_args(Init)


def test_literal_choices_sees_through_none_and_ignores_other_types() -> None:
    assert literal_choices(Literal["a", "b"]) == ("a", "b")
    assert literal_choices(Literal["a", "b"] | None) == ("a", "b")
    assert literal_choices(int) is None
    assert literal_choices(str | None) is None


def test_every_flag_reaches_its_field() -> None:
    argv = ["finetune", "--model", "m", "--data", "d.jsonl", "--eval-file", "e.jsonl",
            "--eval-fraction", "0.25", "--task", "causal-lm", "--out", "o", "--max-length", "7",
            "--padding", "max-length", "--truncation-side", "left", "--epochs", "2",
            "--max-steps", "5", "--batch-size", "3", "--eval-batch-size", "4", "--grad-accum", "2",
            "--lr", "0.5", "--weight-decay", "0.1", "--warmup-steps", "1", "--schedule", "cosine",
            "--max-grad-norm", "0", "--seed", "9", "--eval-every", "0", "--log-every", "0",
            "--save-every", "3", "--keep-checkpoints", "5", "--resume", "--threads", "1",
            "--progress", "lines"]  # fmt: skip
    options, _ = options_from_args(build_parser().parse_args(argv))
    assert options == TrainOptions(
        model="m", data="d.jsonl", eval_file="e.jsonl", eval_fraction=0.25, task="causal-lm",
        out="o", max_length=7, padding="max-length", truncation_side="left", epochs=2,
        max_steps=5, batch_size=3, eval_batch_size=4, grad_accum=2, lr=0.5, weight_decay=0.1,
        warmup_steps=1, schedule="cosine", max_grad_norm=0.0, seed=9, eval_every=0,
        log_every=0, save_every=3, keep_checkpoints=5, resume=True, threads=1, progress="lines",
    )  # fmt: skip
    # The flags left at their defaults above: a switch each, and --overwrite excludes --resume.
    options, _ = options_from_args(build_parser().parse_args(["finetune", "--overwrite", "--fsdp"]))
    assert options.overwrite and options.fsdp


def test_a_flag_is_typed_by_its_annotation() -> None:
    @dataclasses.dataclass(frozen=True)
    class Demo:
        count: int = option(1, "how many", "g")
        rate: float | None = option(None, "", "g", "no rate")
        mode: Literal["x", "y"] = option("x", "which", "g")
        loud: bool = option(False, "shout", "g")
        name: str = option("n", "", "other group")

    parser = argparse.ArgumentParser()
    add_arguments(parser.add_argument_group("g"), Demo)
    args = parser.parse_args(["--count", "3", "--rate", "0.5", "--mode", "y", "--loud"])
    assert not hasattr(args, "name")  # its group is another one
    args.name = "n"
    assert from_args(Demo, args) == Demo(count=3, rate=0.5, mode="y", loud=True)
    assert "how many (default: 1)" in parser.format_help()
    assert "(default: no rate)" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "z"])
