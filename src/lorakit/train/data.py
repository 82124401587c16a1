"""Training data for ``lorakit finetune``, one step per module, re-exported here:

* :mod:`.records`: read ``.jsonl``/``.json``/``.csv`` into records that keep their line;
* :mod:`.formats`: the record formats each task accepts (``text`` + ``label``; ``text``,
  or ``prompt`` + ``completion``) and :func:`validate_records`, with the field checks in
  :mod:`.data_checks`;
* :mod:`.labels`: the class-label map; :mod:`.split`: the held-out eval records;
* :mod:`.tokenization`: truncation side, EOS and completion-only labels;
  :mod:`.datasets`: the tokenised datasets; :mod:`.batching`: padding into batches.

``from lorakit.train.data import Collator`` (and every other name below) keeps working.
"""

from .batching import Collator, collate, pad_token_id
from .datasets import CausalLMDataset, SeqClsDataset
from .formats import validate_records
from .labels import build_label_map, encode_labels
from .records import LINE_KEY, DataError, Record, read_records
from .split import split_eval
from .tokenization import IGNORE_INDEX, TRUNCATION_SIDES, TruncationSide

__all__ = [
    "IGNORE_INDEX",
    "LINE_KEY",
    "TRUNCATION_SIDES",
    "CausalLMDataset",
    "Collator",
    "DataError",
    "Record",
    "SeqClsDataset",
    "TruncationSide",
    "build_label_map",
    "collate",
    "encode_labels",
    "pad_token_id",
    "read_records",
    "split_eval",
    "validate_records",
]
