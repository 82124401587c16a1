"""Recipes: a named job's values sit between the defaults and the flags a user gives."""

from __future__ import annotations

import pytest

from lorakit.cli import build_parser, main
from lorakit.cli.finetune import options_from_args
from lorakit.errors import ConfigError
from lorakit.train import TrainOptions
from lorakit.train.chat_job import chat_job_files
from lorakit.train.recipes import recipe, recipe_job


def _parse(*argv: str):
    return options_from_args(build_parser().parse_args(["finetune", *argv]))


def test_the_chat_recipe_sets_the_llm_job() -> None:
    options, lora = _parse("--recipe", "chat")
    train, held_out = chat_job_files()
    assert (options.model, options.task) == ("smollm2", "causal-lm")
    assert (options.data, options.eval_file) == (str(train), str(held_out))
    assert options.eval_generate > 0 and options.out == "runs/chat"
    assert (lora.rank, lora.alpha, lora.targets) == (16, 32.0, "all-linear")


def test_flags_given_override_the_recipe_even_when_equal_to_the_default() -> None:
    default_lr = TrainOptions().lr
    options, lora = _parse("--recipe", "chat", "--lr", str(default_lr), "--max-steps", "3",
                           "--rank", "4", "--no-labelled-logits-only")  # fmt: skip
    assert options.lr == default_lr != recipe("chat").options["lr"]
    assert options.max_steps == 3 and options.labelled_logits_only is False
    assert lora.rank == 4 and lora.alpha == 32.0  # the rest stays the recipe's


def test_without_a_recipe_the_defaults_hold() -> None:
    options, lora = _parse()
    assert options == TrainOptions()
    assert (lora.rank, lora.alpha, lora.targets) == (8, 16.0, "all-linear")


def test_recipe_job_in_python() -> None:
    options, lora = recipe_job("chat", max_steps=2, out="elsewhere")
    assert (options.max_steps, options.out, options.model) == (2, "elsewhere", "smollm2")
    assert lora.rank == 16


def test_unknown_recipe_names_the_known_ones(capsys) -> None:
    with pytest.raises(ConfigError, match=r"recipe must be one of \['chat'\], got 'nope'"):
        recipe("nope")
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--recipe", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err
