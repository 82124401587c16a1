"""Loading the base model and tokenizer for a task, offline, with errors before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .options import TASKS, Task

# Suffixes of `architectures` entries in a model's config.json, per task.
_ARCH_SUFFIXES: dict[str, tuple[str, ...]] = {
    "seq-cls": ("ForSequenceClassification",),
    "causal-lm": ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"),
}


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a local model folder.

    Raises:
        ConfigError: the folder or its config.json is missing or not valid JSON.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ConfigError(f"model folder {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model folder {str(path)!r} has no config.json; pass a Hugging Face model folder "
            "(one written by save_pretrained)"
        )
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file}: not valid JSON ({err})") from None


def infer_task(config: dict[str, Any], task: str | None, model_dir: str | Path) -> Task:
    """`task` when given (validated), else the task that the config's `architectures` name.

    Raises:
        ConfigError: `task` is unknown, or it is None and the architectures name no task.
    """
    if task is not None:
        if task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
        return task  # type: ignore[return-value]
    architectures = config.get("architectures") or []
    for name, suffixes in _ARCH_SUFFIXES.items():
        if any(str(a).endswith(suffixes) for a in architectures):
            return name  # type: ignore[return-value]
    raise ConfigError(
        f"cannot infer the task of {str(model_dir)!r} from architectures={architectures}; "
        f"pass --task, one of {list(TASKS)}"
    )


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's own tokenizer, from local files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {str(model_dir)!r}: {err}") from None


def load_model(
    model_dir: str | Path,
    task: Task,
    label_map: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The base model for `task`, from local files only (no network).

    seq-cls gets a sequence-classification head sized by `label_map` (label -> id);
    causal-lm a language-model head. dtype: load in it; None keeps the checkpoint's.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    hf_logging.disable_progress_bar()
    common: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        common["dtype"] = dtype
    try:
        if task == "seq-cls":
            labels = label_map or {}
            return AutoModelForSequenceClassification.from_pretrained(
                str(model_dir),
                **common,
                num_labels=len(labels),
                id2label={i: label for label, i in labels.items()},
                label2id=dict(labels),
            )
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **common)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a {task} model from {str(model_dir)!r}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
