"""What an adapter needs to be used again, recorded when it is saved and checked when read.

- `base_model_name_or_path` (adapter_config.json, PEFT's key): the base model as the user
  named it: the "smollm2" alias, or the model folder as given; never a path that lorakit or
  a package resolved it to (a cache or virtualenv folder means nothing on another machine).
- `task_type` (adapter_config.json, PEFT's key): "SEQ_CLS" or "CAUSAL_LM", from the class of
  the model the adapter was trained on; PEFT builds the matching PeftModel from it.
- `lorakit_id2label` (the weights' header metadata): a classifier's label names by class id.
  It is not in adapter_config.json because PEFT warns about every key it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from torch import nn

from ..errors import CheckpointError
from .safe_json import parse_json
from .schema import check_types

META_ID2LABEL = "lorakit_id2label"
# lorakit's task names and PEFT's task_type values for them.
TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
# transformers class-name endings per PEFT task_type (GPT-2's head is "LMHeadModel").
_CLASS_ENDINGS = {
    "SEQ_CLS": ("ForSequenceClassification",),
    "CAUSAL_LM": ("ForCausalLM", "LMHeadModel"),
}

# The heads PEFT's SEQ_CLS model wraps as modules_to_save.
_HEADS = ("classifier", "score")


@dataclass(frozen=True)
class BaseModelInfo:
    """The base model an adapter was saved for: how the user named it, PEFT's task_type, and a
    classifier's label names in class-id order (None where unknown or not a classifier)."""

    name_or_path: str | None = None
    task_type: str | None = None
    labels: tuple[str, ...] | None = None

    @property
    def task(self) -> str | None:
        """lorakit's task name ("seq-cls", "causal-lm") of `task_type`; None for any other."""
        return {v: k for k, v in TASK_TYPES.items()}.get(self.task_type or "")

    @property
    def label_map(self) -> dict[str, int] | None:
        """{label name: class id}, as `lorakit finetune` and `load_model` take labels."""
        return None if self.labels is None else {name: i for i, name in enumerate(self.labels)}


def describe_base(
    model: nn.Module,
    name_or_path: str | PathLike | None = None,
    modules_to_save: Collection[str] = (),
) -> BaseModelInfo:
    """The BaseModelInfo of a (transformers) model with an adapter saving `modules_to_save`:
    `name_or_path` when given, else the config's `_name_or_path` (lorakit's cached SmolLM2
    folder written as its alias); a classifier's labels from its config's id2label."""
    config = getattr(model, "config", None)
    task_type = task_type_of(model, modules_to_save)
    if name_or_path is None:
        name_or_path = _alias(getattr(config, "_name_or_path", None) or None)
    labels = None
    id2label = getattr(config, "id2label", None)
    if _model_task(model) == "SEQ_CLS" and isinstance(id2label, Mapping) and id2label:
        labels = tuple(str(id2label[i]) for i in sorted(id2label, key=int))
    return BaseModelInfo(None if name_or_path is None else str(name_or_path), task_type, labels)


def task_type_of(model: nn.Module, modules_to_save: Collection[str] = ()) -> str | None:
    """PEFT's task_type of a transformers model, by its class name; None for any other.

    SEQ_CLS only when the adapter saves the model's classification head: PEFT then wraps the
    head (`classifier` / `score`) and refuses a file without its weights."""
    task_type = _model_task(model)
    if task_type == "SEQ_CLS":
        heads = [name for name, _ in model.named_children() if name in _HEADS]
        if not all(head in modules_to_save for head in heads):
            return None
    return task_type


def _model_task(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((t for t, ends in _CLASS_ENDINGS.items() if name.endswith(ends)), None)


def _alias(name_or_path: str | None) -> str | None:
    """"smollm2" for lorakit's cached SmolLM2 folder (the default cache), else unchanged."""
    from ..llm.model import SMOLLM2, smollm2_folder

    if name_or_path is not None and Path(name_or_path) == smollm2_folder():
        return SMOLLM2
    return name_or_path


def id2label_metadata(info: BaseModelInfo) -> dict[str, str]:
    """The header metadata entry of `info`'s labels ({} when it has none)."""
    if info.labels is None:
        return {}
    return {META_ID2LABEL: json.dumps({str(i): name for i, name in enumerate(info.labels)})}


def saved_labels(metadata: Mapping[str, str], weights: Path) -> tuple[str, ...] | None:
    """The label names stored in the weights' header, checked: an object {"0": name, ...}
    with ids 0..n-1 and distinct non-empty names. None when there are none."""
    if META_ID2LABEL not in metadata:
        return None
    source = f"{weights} metadata {META_ID2LABEL}"
    value = parse_json(metadata[META_ID2LABEL], source)
    if not isinstance(value, dict) or not value:
        raise CheckpointError(f"{source} must be a non-empty JSON object, got {value!r:.80}")
    if sorted(value) != sorted(str(i) for i in range(len(value))):
        raise CheckpointError(f"{source} must have the class ids 0..{len(value) - 1} as keys, "
                              f"got {sorted(value)!r:.80}")  # fmt: skip
    labels = tuple(value[str(i)] for i in range(len(value)))
    if not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
        raise CheckpointError(f"{source} must map ids to distinct non-empty label names, "
                              f"got {labels!r:.80}")  # fmt: skip
    return labels


def read_base(config: Mapping[str, object], metadata: Mapping[str, str], folder: Path,
              weights: Path) -> BaseModelInfo:  # fmt: skip
    """The BaseModelInfo a saved adapter records (its config and header metadata), checked.

    Raises:
        CheckpointError: a field has the wrong type, naming the file and the field.
    """
    check_types(config, str(folder / "adapter_config.json"))
    return BaseModelInfo(
        config.get("base_model_name_or_path") or None,  # type: ignore[arg-type]
        config.get("task_type") or None,  # type: ignore[arg-type]
        saved_labels(metadata, weights),
    )


def restamp_base(path: str | PathLike, name_or_path: str | None) -> Path:
    """Rewrite the saved adapter at `path` with `name_or_path` as its base model (config and
    the copy in the weights' header), atomically; tensors and other fields unchanged."""
    from .files import canonical, open_adapter
    from .save import write_files
    from .validate import META_CONFIG

    with open_adapter(path) as files:
        tensors = files.read(list(files.entries))
        folder, config, metadata = files.folder, dict(files.config), dict(files.metadata)
    config["base_model_name_or_path"] = name_or_path
    if META_CONFIG in metadata:
        metadata[META_CONFIG] = canonical(config)
    metadata.pop("format", None)  # safetensors_bytes writes it
    write_files(folder, tensors, metadata, config)
    return folder
