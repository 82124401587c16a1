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


# Files that hold a tokenizer's vocabulary; without one, transformers quietly builds a
# tokenizer of special tokens only and every word becomes [UNK].
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def check_tokenizer_files(model_dir: str | Path) -> None:
    """Raise ConfigError naming the folder when it holds no tokenizer vocabulary file."""
    path = Path(model_dir)
    if any((path / name).is_file() for name in TOKENIZER_FILES) or any(path.glob("*.tiktoken")):
        return
    raise ConfigError(
        f"model folder {str(path)!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}"
        "); copy in the files the model's tokenizer.save_pretrained wrote"
    )


def check_weight_files(model_dir: str | Path) -> None:
    """Read the header of every safetensors file in the folder: damage named before loading.

    Raises:
        CheckpointError: a file is truncated or is not safetensors, naming it.
    """
    from ..checkpoint.safetensors_file import SafetensorsFile

    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        with SafetensorsFile(weights):  # the header and layout are checked on opening
            pass


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's own tokenizer, from local files only.

    Raises:
        ConfigError: the folder holds no tokenizer files, or transformers cannot read them.
    """
    from transformers import AutoTokenizer

    check_tokenizer_files(model_dir)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {str(model_dir)!r}: {err}") from None


def load_model(
    model_dir: str | Path,
    task: Task,
    label_map: dict[str, int] | None = None,
    dtype: torch.dtype | None = None,
    labels_source: str = "the training data",
    quantization_config: Any = None,
) -> nn.Module:
    """The base model for `task`, from local files only (no network).

    seq-cls gets a sequence-classification head sized by `label_map` (label -> id; None
    keeps the checkpoint's labels); causal-lm a language-model head. dtype: load in it;
    None keeps the checkpoint's. `labels_source` names where `label_map` came from in errors.
    quantization_config: transformers' (e.g. `BitsAndBytesConfig`), or None.

    Raises:
        ConfigError: the checkpoint's classification head has another number of labels.
        CheckpointError: a weights file is damaged.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_weight_files(model_dir)
    if task == "seq-cls" and label_map is not None:
        check_head(read_model_config(model_dir), model_dir, label_map, labels_source)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    hf_logging.disable_progress_bar()
    common: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        common["dtype"] = dtype
    if quantization_config is not None:
        common["quantization_config"] = quantization_config
    try:
        if task == "seq-cls":
            return AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), **common, **label_kwargs(label_map)
            )
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **common)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"cannot load a {task} model from {str(model_dir)!r}: {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def head_labels(config: dict[str, Any]) -> int | None:
    """How many labels the checkpoint's sequence-classification head has; None: no head."""
    architectures = config.get("architectures") or []
    if not any(str(a).endswith(_ARCH_SUFFIXES["seq-cls"]) for a in architectures):
        return None
    id2label = config.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.get("num_labels", 2))  # transformers' default head has 2 labels


def label_kwargs(label_map: dict[str, int] | None) -> dict[str, Any]:
    """from_pretrained's keyword arguments for a head of `label_map`'s labels (None: none)."""
    if label_map is None:
        return {}
    return {
        "num_labels": len(label_map),
        "id2label": {i: label for label, i in label_map.items()},
        "label2id": dict(label_map),
    }


def check_head(
    config: dict[str, Any],
    model_dir: str | Path,
    label_map: dict[str, int],
    labels_source: str = "the training data",
) -> None:
    """Refuse a checkpoint whose classification head does not have one output per label."""
    n = head_labels(config)
    if n is None or n == len(label_map):
        return
    raise ConfigError(
        f"{Path(model_dir) / 'config.json'}: the checkpoint's classification head has {n} "
        f"labels but {labels_source} has {len(label_map)} ({', '.join(map(repr, label_map))})"
        "; use data with that many classes, or a model folder without a classification head"
    )
