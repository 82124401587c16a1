"""The data of a `finetune` run: records read and checked, the eval split, the datasets and
their collator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    CausalLMDataset,
    Collator,
    Record,
    SeqClsDataset,
    build_label_map,
    pad_token_id,
    read_records,
    split_eval,
    validate_records,
)
from .finetune_inputs import FinetuneInputs
from .model import load_tokenizer
from .options import TrainOptions


@dataclass(frozen=True)
class FinetuneData:
    """Train and eval datasets, their collator, the tokenizer's pad id, the label map
    (seq-cls; else None), the file the eval examples come from (the data file itself
    when they were split from it), the eval records as read, and the tokenizer."""

    train: SeqClsDataset | CausalLMDataset
    eval: SeqClsDataset | CausalLMDataset
    collator: Collator
    pad: int
    label_map: dict[str, int] | None
    eval_file: Path
    eval_records: list[Record]
    tokenizer: Any


def prepare_data(options: TrainOptions, inputs: FinetuneInputs) -> FinetuneData:
    """Tokenize the checked records with the model's tokenizer.

    Raises:
        DataError: bad data, naming the file, line and field.
    """
    tokenizer = load_tokenizer(inputs.model_dir)
    train_records, eval_records, eval_file = _read(options, inputs)
    data_file, task = inputs.data_file, inputs.task
    label_map = build_label_map(train_records, data_file) if task == "seq-cls" else None
    n, side = options.max_length, options.truncation_side
    if task == "seq-cls":
        train_data = SeqClsDataset(train_records, tokenizer, label_map, n, data_file, side)
        eval_data = SeqClsDataset(eval_records, tokenizer, label_map, n, eval_file, side)
    else:
        train_data = CausalLMDataset(train_records, tokenizer, n, data_file, side)
        eval_data = CausalLMDataset(eval_records, tokenizer, n, eval_file, side)
    pad = pad_token_id(tokenizer)
    collator = Collator(pad, pad_to=n if options.padding == "max-length" else None)
    return FinetuneData(
        train_data, eval_data, collator, pad, label_map, eval_file, eval_records, tokenizer
    )


def _read(options: TrainOptions, inputs: FinetuneInputs) -> tuple[list[Record], list[Record], Path]:
    """Train and eval records, checked for `inputs.task`, and the eval records' file; without
    an eval file, `eval_fraction` of the data is held out."""
    train_records = read_records(inputs.data_file)
    validate_records(train_records, inputs.task, inputs.data_file)
    if inputs.eval_file is None:
        train_records, eval_records = split_eval(train_records, options.eval_fraction, options.seed)
        return train_records, eval_records, inputs.data_file
    eval_records = read_records(inputs.eval_file)
    validate_records(eval_records, inputs.task, inputs.eval_file)
    return train_records, eval_records, inputs.eval_file
