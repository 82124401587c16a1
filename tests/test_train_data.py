"""Tests for lorakit.train.data and the modules it re-exports (reading, record formats,
validation, labels, tokenisation, batching) and the demo data."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.train.data import (
    IGNORE_INDEX,
    LINE_KEY,
    CausalLMDataset,
    Collator,
    DataError,
    SeqClsDataset,
    build_label_map,
    collate,
    encode_labels,
    pad_token_id,
    read_records,
    split_eval,
    validate_records,
)
from lorakit.train.demo_data import demo_dataset, demo_model_path
from lorakit.train.formats import FORMATS, record_format


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    """Write ``content`` to ``tmp_path / name`` (str as UTF-8) and return the path."""
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def strip_lines(records: list[dict]) -> list[dict]:
    """Records without the line-number bookkeeping key."""
    return [{k: v for k, v in r.items() if k != LINE_KEY} for r in records]


@pytest.fixture(scope="module")
def tokenizer():
    """The real (offline) MiniLM WordPiece tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(demo_model_path())


# --------------------------------------------------------------------------- reading


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad", "label": 0}]
    path = write(tmp_path, "d.jsonl", f"{json.dumps(rows[0])}\n\n  \n{json.dumps(rows[1])}\n")
    records = read_records(path)
    assert strip_lines(records) == rows
    assert [r[LINE_KEY] for r in records] == [1, 4]


def test_csv_round_trip_counts_header_as_line_1(tmp_path):
    path = write(tmp_path, "d.csv", 'text,label\ngood film,pos\n"bad, really",neg\n')
    records = read_records(path)
    assert strip_lines(records) == [
        {"text": "good film", "label": "pos"},
        {"text": "bad, really", "label": "neg"},
    ]
    assert [r[LINE_KEY] for r in records] == [2, 3]


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path, "d.csv", "\ufefftext,label\ncafé,x\n")
    assert strip_lines(read_records(path)) == [{"text": "café", "label": "x"}]


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.jsonl", "", r"empty\.jsonl: file is empty"),
        ("blank.jsonl", "\n  \n", r"blank\.jsonl: file is empty"),
        ("header.csv", "text,label\n", r"header\.csv: file is empty"),
        (
            "latin.jsonl",
            '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"),
            r"latin\.jsonl, line 2: not valid UTF-8 \(bad byte at offset 28\)",
        ),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b",}\n', r"bad\.jsonl, line 2: invalid JSON"),
        ("list.jsonl", '{"text": "a"}\n["b"]\n', r"list\.jsonl, line 2: expected a JSON object"),
        ("wide.csv", "text,label\na,b,c\n", r"wide\.csv, line 2: row has more fields"),
        ("data.txt", "hello\n", r"data\.txt: unsupported file type '\.txt'"),
        (
            "deep.jsonl",
            '{"text": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
            r"deep\.jsonl, line 2: JSON nested too deeply",
        ),
        (
            "digits.jsonl",
            '{"text": "a", "label": ' + "9" * 5000 + "}\n",
            r"digits\.jsonl, line 1: unreadable JSON value \(Exceeds the limit",
        ),
    ],
)
def test_read_errors(tmp_path, name, content, pattern):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=pattern):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found") as info:
        read_records(tmp_path / "nope.jsonl")
    assert isinstance(info.value, LorakitError) and isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- validation

JSONL_BAD = '{"text": "a", "label": "x"}\n'


@pytest.mark.parametrize(
    ("name", "content", "task", "message"),
    [
        ("a.jsonl", JSONL_BAD + '{"text": "b"}\n', "seq-cls", "line 2: missing field 'label'"),
        ("a.jsonl", JSONL_BAD + '{"label": "x"}\n', "seq-cls", "line 2: missing field 'text'"),
        (
            "a.jsonl",
            JSONL_BAD + '{"text": "", "label": "x"}\n',
            "seq-cls",
            "line 2: field 'text' must be a non-empty string",
        ),
        (
            "a.jsonl",
            JSONL_BAD + '{"text": "b", "label": 1.5}\n',
            "seq-cls",
            "line 2: field 'label' must be a string or integer",
        ),
        ("a.csv", "text,label\na,x\nb,\n", "seq-cls", "line 3: field 'label' must be"),
        ("a.csv", "text,label\na,x\n,y\n", "seq-cls", "line 3: field 'text' must be"),
        (
            "b.jsonl",
            '{"text": "a"}\n\n{"label": "x"}\n',
            "causal-lm",
            "line 3: missing field 'text'",
        ),
        ("b.jsonl", '{"prompt": "q"}\n', "causal-lm", "line 1: missing field 'completion'"),
        ("b.jsonl", '{"completion": "a"}\n', "causal-lm", "line 1: missing field 'prompt'"),
        ("b.csv", "prompt,completion\nq,\n", "causal-lm", "line 2: field 'completion' must be"),
    ],
)
def test_validate_errors_name_file_line_and_field(tmp_path, name, content, task, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=re.escape(f"{path}, {message}")):
        validate_records(read_records(path), task, path)


@pytest.mark.parametrize(
    ("content", "task"),
    [
        ('{"text": "a", "label": 3}\n', "seq-cls"),
        ('{"text": "a"}\n', "causal-lm"),
        ('{"prompt": "", "completion": "a"}\n', "causal-lm"),
        ('{"text": "", "prompt": "q", "completion": "a"}\n', "causal-lm"),
    ],
)
def test_validate_accepts(tmp_path, content, task):
    path = write(tmp_path, "ok.jsonl", content)
    validate_records(read_records(path), task, path)


@pytest.mark.parametrize(
    ("record", "task", "format_name"),
    [
        ({"text": "a", "label": "x"}, "seq-cls", "text+label"),
        ({"label": "x"}, "seq-cls", "text+label"),  # its check then names 'text'
        ({"text": "a"}, "causal-lm", "text"),
        ({"text": "a", "prompt": "q", "completion": "c"}, "causal-lm", "text"),
        ({"text": "", "prompt": "q", "completion": "c"}, "causal-lm", "prompt+completion"),
        ({"prompt": "q"}, "causal-lm", "prompt+completion"),
        ({"completion": "c"}, "causal-lm", "prompt+completion"),
    ],
)
def test_record_format_is_picked_by_the_fields_present(record, task, format_name):
    assert record_format({**record, LINE_KEY: 4}, task, "d.jsonl").name == format_name


def test_record_in_no_format_names_every_format_of_the_task():
    with pytest.raises(DataError) as caught:
        record_format({"label": "x", LINE_KEY: 4}, "causal-lm", "d.jsonl")
    assert str(caught.value) == (
        "d.jsonl, line 4: missing field 'text' "
        "(causal-lm needs 'text', or 'prompt' and 'completion', or 'messages')"
    )


def test_unknown_task_is_refused_even_without_records():
    with pytest.raises(
        ValueError, match=r"unknown task 'cls' \(expected 'seq-cls' or 'causal-lm'\)"
    ):
        validate_records([], "cls", "d.jsonl")


def test_every_causal_lm_format_has_an_encoder():
    assert all(fmt.encode is not None for fmt in FORMATS["causal-lm"])


# --------------------------------------------------------------------------- labels, split


def test_label_map_is_sorted_strings():
    records = [{"label": "b"}, {"label": 2}, {"label": "2"}, {"label": "a"}]
    assert build_label_map(records) == {"2": 0, "a": 1, "b": 2}
    assert encode_labels(records, build_label_map(records), "f") == [2, 0, 0, 1]


@pytest.mark.parametrize("labels", [["pos", "pos", "pos"], ["1", 1]])
def test_label_map_needs_two_classes(labels):
    records = [{"label": label} for label in labels]
    pattern = r"train\.jsonl: field 'label' has 1 distinct value\(s\) \['(pos|1)'\]"
    with pytest.raises(DataError, match=pattern + ".*at least 2 classes"):
        build_label_map(records, "train.jsonl")


def test_unseen_label(tmp_path):
    path = write(
        tmp_path, "eval.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n'
    )
    pattern = re.escape(
        f"{path}, line 2: label 'meh' does not occur in the training data "
        "(known labels: 'neg', 'pos')"
    )
    with pytest.raises(DataError, match=pattern):
        encode_labels(read_records(path), {"neg": 0, "pos": 1}, path)


def test_split_eval_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(100)]
    train, evaluation = split_eval(records, 0.2, seed=7)
    assert (len(train), len(evaluation)) == (80, 20)
    assert (train, evaluation) == split_eval(records, 0.2, seed=7)
    assert sorted(r["text"] for r in train + evaluation) == sorted(r["text"] for r in records)
    assert split_eval(records, 0.2, seed=8) != (train, evaluation)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_eval_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match="eval_fraction must be between 0 and 1"):
        split_eval([{"text": "a"}, {"text": "b"}], fraction, seed=0)


# --------------------------------------------------------------------------- tokenisation


def test_causal_lm_masks_prompt_tokens(tokenizer):
    records = [{"prompt": "what is two plus two ?", "completion": "four , of course", LINE_KEY: 1}]
    example = CausalLMDataset(records, tokenizer, max_length=64, path="p.jsonl")[0]
    n_prompt = len(tokenizer(records[0]["prompt"])["input_ids"])
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) > n_prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == "four, of course"


def test_causal_lm_plain_text_trains_on_all_tokens_and_truncates(tokenizer):
    records = [{"text": "one two three four five six seven eight"}]
    example = CausalLMDataset(records, tokenizer, max_length=5, path="p.jsonl")[0]
    assert len(example["input_ids"]) == 5
    assert example["labels"] == example["input_ids"]


def test_causal_lm_prompt_too_long(tokenizer):
    records = [{"prompt": "a b c d e f g h", "completion": "z", LINE_KEY: 4}]
    message = r"p\.jsonl, line 4: prompt is 10 tokens.*truncation_side='left'"
    with pytest.raises(DataError, match=message):
        CausalLMDataset(records, tokenizer, max_length=8, path="p.jsonl")


def test_seq_cls_dataset_and_collate(tokenizer):
    records = [{"text": "good"}, {"text": "not good at all"}]
    records = [{**r, "label": y} for r, y in zip(records, ["pos", "neg"])]
    dataset = SeqClsDataset(records, tokenizer, {"neg": 0, "pos": 1}, 16, "d.jsonl")
    batch = Collator(pad_token_id(tokenizer))([dataset[0], dataset[1]])
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["input_ids"][0, 3:].tolist() == [tokenizer.pad_token_id] * 3


def test_collate_pads_lm_labels_with_ignore_index():
    batch = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())


def test_pad_token_falls_back_to_eos():
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=50256)) == 50256
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    with pytest.raises(DataError, match="neither a pad token nor an EOS token"):
        pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


class CharTokenizer:
    """A fake tokenizer: one id per character, EOS id 9."""

    eos_token_id = 9

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_eos_is_appended_to_completion_and_text():
    records = [{"prompt": "ab", "completion": "c"}, {"text": "xy"}]
    dataset = CausalLMDataset(records, CharTokenizer(), max_length=10, path="p")
    assert dataset[0] == {"input_ids": [97, 98, 99, 9], "labels": [IGNORE_INDEX] * 2 + [99, 9]}
    assert dataset[1] == {"input_ids": [120, 121, 9], "labels": [120, 121, 9]}


# --------------------------------------------------------------------------- truncation side


def test_left_truncation_keeps_the_end_of_a_text():
    records = [{"text": "abcdefgh"}]
    right = CausalLMDataset(records, CharTokenizer(), max_length=4, path="p")[0]
    left = CausalLMDataset(records, CharTokenizer(), 4, "p", truncation_side="left")[0]
    assert right["input_ids"] == [ord(c) for c in "abcd"]
    assert left["input_ids"] == [ord(c) for c in "fgh"] + [9]  # ends with the EOS
    assert left["labels"] == left["input_ids"]


def test_left_truncation_cuts_the_prompt_start_and_keeps_the_completion():
    records = [{"prompt": "abcdefgh", "completion": "xy", LINE_KEY: 2}]
    example = CausalLMDataset(records, CharTokenizer(), 6, "p", truncation_side="left")[0]
    assert example["input_ids"] == [ord(c) for c in "fghxy"] + [9]  # 6 - 3 prompt tokens kept
    assert example["labels"] == [IGNORE_INDEX] * 3 + [ord("x"), ord("y"), 9]
    # With right truncation the same record fails: its prompt alone fills max_length.
    with pytest.raises(DataError, match=r"p, line 2: prompt is 8 tokens"):
        CausalLMDataset(records, CharTokenizer(), 6, "p")


def test_left_truncation_refuses_a_completion_that_fills_max_length():
    records = [{"prompt": "ab", "completion": "wxyz", LINE_KEY: 3}]
    message = r"p, line 3: completion is 5 tokens, leaving no room for the prompt"
    with pytest.raises(DataError, match=message):
        CausalLMDataset(records, CharTokenizer(), 5, "p", truncation_side="left")


def test_seq_cls_left_truncation_keeps_the_end_and_special_tokens(tokenizer):
    records = [{"text": "one two three four five six seven eight", "label": "x"}]
    dataset = SeqClsDataset(records, tokenizer, {"x": 0}, 5, "d", truncation_side="left")
    assert tokenizer.decode(dataset[0]["input_ids"]) == "[CLS] six seven eight [SEP]"
    assert tokenizer.truncation_side == "right"  # the shared tokenizer is left as it was
    right = SeqClsDataset(records, tokenizer, {"x": 0}, 5, "d")
    assert tokenizer.decode(right[0]["input_ids"]) == "[CLS] one two three [SEP]"


@pytest.mark.parametrize("dataset", [SeqClsDataset, CausalLMDataset])
def test_bad_truncation_side_names_the_option(tokenizer, dataset):
    args = ([], tokenizer, {}, 8) if dataset is SeqClsDataset else ([], tokenizer, 8)
    with pytest.raises(ConfigError, match=r"truncation_side must be one of .*'middle'"):
        dataset(*args, "p", truncation_side="middle")


# --------------------------------------------------------------------------- padding


def test_max_length_padding_gives_fixed_width_batches_with_masked_labels():
    records = [{"prompt": "ab", "completion": "c"}, {"text": "xyz"}]
    dataset = CausalLMDataset(records, CharTokenizer(), max_length=8, path="p")
    batch = Collator(0, pad_to=8)([dataset[0], dataset[1]])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 8), "attention_mask": (2, 8), "labels": (2, 8),
    }  # fmt: skip
    assert batch["attention_mask"].sum(1).tolist() == [4, 4]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    # Dynamic padding (the default) stops at the longest example.
    assert Collator(0)([dataset[0], dataset[1]])["input_ids"].shape == (2, 4)


def test_max_length_padding_for_classification(tokenizer):
    records = [{"text": "good", "label": "pos"}]
    dataset = SeqClsDataset(records, tokenizer, {"pos": 0}, 16, "d.jsonl")
    batch = Collator(pad_token_id(tokenizer), pad_to=16)([dataset[0]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, 16)
    assert batch["attention_mask"].sum().item() == 3 and batch["labels"].tolist() == [0]


def test_pad_to_shorter_than_an_example_is_refused():
    with pytest.raises(DataError, match=r"an example has 3 tokens, more than pad_to=2"):
        collate([{"input_ids": [1, 2, 3], "labels": 0}], pad_token_id=0, pad_to=2)


# --------------------------------------------------------------------------- demo data


def test_demo_dataset_is_deterministic_balanced_and_disjoint(tmp_path):
    first = demo_dataset(tmp_path / "a")
    second = demo_dataset(tmp_path / "b")
    for p1, p2 in zip(first, second):
        assert p1.read_bytes() == p2.read_bytes()
    train, evaluation = (read_records(p) for p in first)
    for records, path in ((train, first[0]), (evaluation, first[1])):
        validate_records(records, "seq-cls", path)
        counts = Counter(r["label"] for r in records)
        assert set(counts) == {"negative", "positive"}
        assert counts["negative"] == counts["positive"]
    assert len(train) >= 1000 and len(evaluation) >= 200
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
