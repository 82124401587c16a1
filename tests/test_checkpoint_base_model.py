"""A saved adapter records its base model as the user named it, PEFT's task_type and a
classifier's label names; the fields are checked on reading, shown by `lorakit inspect`,
used by `lorakit merge`, and PEFT reads the config without a warning."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomise_lora, tiny_bert, tiny_llama
from torch import nn

import lorakit
from lorakit.checkpoint import read_adapter
from lorakit.checkpoint.base_model import (
    META_ID2LABEL,
    BaseModelInfo,
    read_base,
    restamp_base,
)
from lorakit.checkpoint.files import canonical, open_adapter
from lorakit.checkpoint.save import write_files
from lorakit.checkpoint.validate import META_CONFIG
from lorakit.cli import main
from lorakit.cli.inspect import describe
from lorakit.errors import CheckpointError

LABELS = ("neg", "mid", "pos")
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def _labelled_bert() -> nn.Module:
    model = tiny_bert()
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    return model


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4))


HEAD = {"targets": ("query",), "modules_to_save": ("classifier",)}
# (id, model, LoRA options, expected task_type, expected labels)
CASES = [
    ("causal-lm", tiny_llama, {"targets": ("q_proj",)}, "CAUSAL_LM", None),
    ("seq-cls", _labelled_bert, HEAD, "SEQ_CLS", LABELS),
    # PEFT's SEQ_CLS model wraps the head and refuses a file without it: no task_type then
    ("seq-cls-head-not-saved", _labelled_bert, {"targets": ("query",)}, None, LABELS),
    ("plain-torch", _plain, {"targets": ("0",)}, None, None),
]


def _save(make: Callable[[], nn.Module], options: dict, folder: Path, **kwargs) -> nn.Module:
    model = make()
    lorakit.inject(model, lorakit.LoraConfig(rank=2, **options))
    randomise_lora(model)
    lorakit.save_adapter(model, folder, **kwargs)
    return model


def _stored(folder: Path) -> BaseModelInfo:
    folder, config, _, metadata = read_adapter(folder)
    return read_base(config, metadata, folder, folder / "adapter_model.safetensors")


@pytest.mark.parametrize(("id_", "make", "options", "task_type", "labels"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_round_trip(id_, make, options, task_type, labels, tmp_path: Path) -> None:
    _save(make, options, tmp_path, base_model="models/my-base")
    stored = _stored(tmp_path)
    assert stored == BaseModelInfo("models/my-base", task_type, labels)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == task_type
    assert config["base_model_name_or_path"] == "models/my-base"
    assert META_ID2LABEL not in config  # PEFT warns about keys it does not know


def test_base_defaults_to_the_config_name_and_the_smollm2_alias(tmp_path, monkeypatch) -> None:
    from lorakit.llm.model import smollm2_folder

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    for name_or_path, want in [("some/folder", "some/folder"), (smollm2_folder(), "smollm2"),
                               ("", None)]:  # fmt: skip
        model = tiny_llama()
        model.config._name_or_path = str(name_or_path)
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("q_proj",)))
        lorakit.save_adapter(model, tmp_path / "a")
        assert _stored(tmp_path / "a").name_or_path == want


def test_restamp_changes_only_the_base_name(tmp_path: Path) -> None:
    model = _save(_labelled_bert, HEAD, tmp_path, base_model="/venv/site-packages/model")
    before = read_adapter(tmp_path)[2]
    assert restamp_base(tmp_path, "my-model") == tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # config and the header's copy agree
        folder, config, tensors, metadata = read_adapter(tmp_path)
    assert config["base_model_name_or_path"] == "my-model"
    assert json.loads(metadata[META_CONFIG]) == config
    assert _stored(tmp_path) == BaseModelInfo("my-model", "SEQ_CLS", LABELS)
    assert tensors.keys() == before.keys()
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)
    loaded = lorakit.from_pretrained(_labelled_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def _rewrite(folder: Path, config: dict | None = None, metadata: dict | None = None) -> None:
    """Rewrite the saved adapter with config / header fields changed (both copies agree)."""
    with open_adapter(folder) as files:
        tensors = files.read(list(files.entries))
        new_config, new_meta = {**files.config, **(config or {})}, dict(files.metadata)
    new_meta.update({META_CONFIG: canonical(new_config), **(metadata or {})})
    new_meta.pop("format")
    write_files(folder, tensors, new_meta, new_config)


BAD = [
    ({"task_type": 3}, None, "adapter_config.json: task_type must be a string, got 3"),
    ({"base_model_name_or_path": ["a"]}, None,
     "adapter_config.json: base_model_name_or_path must be a string, got ['a']"),
    (None, {META_ID2LABEL: "{"}, "metadata lorakit_id2label"),
    (None, {META_ID2LABEL: '["neg", "pos"]'},
     "lorakit_id2label must be a non-empty JSON object, got ['neg', 'pos']"),
    (None, {META_ID2LABEL: "{}"}, "lorakit_id2label must be a non-empty JSON object, got {}"),
    (None, {META_ID2LABEL: '{"0": "a", "2": "b"}'},
     "lorakit_id2label must have the class ids 0..1 as keys, got ['0', '2']"),
    (None, {META_ID2LABEL: '{"0": "a", "1": "a"}'},
     "lorakit_id2label must map ids to distinct non-empty label names, got ('a', 'a')"),
    (None, {META_ID2LABEL: '{"0": "a", "1": 7}'},
     "lorakit_id2label must map ids to distinct non-empty label names, got ('a', 7)"),
]  # fmt: skip


@pytest.mark.parametrize(("config", "metadata", "message"), BAD)
def test_malformed_fields_name_file_and_field(config, metadata, message, tmp_path) -> None:
    _save(_labelled_bert, HEAD, tmp_path)
    _rewrite(tmp_path, config, metadata)
    file = "adapter_config.json" if config else "adapter_model.safetensors"
    for read in (describe, lambda p: lorakit.from_pretrained(_labelled_bert(), p)):
        with pytest.raises(CheckpointError, match=file) as err:
            read(tmp_path)
        assert message in str(err.value) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize(("id_", "make", "options", "task_type", "labels"), CASES[:3],
                         ids=[c[0] for c in CASES[:3]])  # fmt: skip
def test_peft_reads_the_config_and_adapter(id_, make, options, task_type, labels, tmp_path):
    model = _save(make, options, tmp_path, base_model="models/my-base")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peft.PeftConfig.from_pretrained(tmp_path)
    assert config.task_type == task_type
    assert config.base_model_name_or_path == "models/my-base"
    peft_model = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    want = {"CAUSAL_LM": "PeftModelForCausalLM", "SEQ_CLS": "PeftModelForSequenceClassification"}
    assert type(peft_model).__name__ == want.get(task_type, "PeftModel")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_inspect_shows_base_task_and_labels(tmp_path: Path, capsys) -> None:
    _save(_labelled_bert, HEAD, tmp_path, base_model="smollm2")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["base_model"], info["task_type"], info["labels"]) == (
        "smollm2", "SEQ_CLS", list(LABELS)
    )
    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for label, value in [("base model", "smollm2"), ("task", "SEQ_CLS"),
                         ("labels", "neg, mid, pos")]:  # fmt: skip
        assert f"{label:<17}{value}" in text


def test_merge_uses_the_stored_base_task_and_labels(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    tiny_bert().save_pretrained(tmp_path / "base")  # default labels LABEL_0..2
    model = _save(_labelled_bert, HEAD, tmp_path / "adapter", base_model=tmp_path / "base")
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    lorakit.save_adapter(model, tmp_path / "adapter", base_model=tmp_path / "base")
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_merge_without_base_needs_a_recorded_one(tmp_path: Path, capsys) -> None:
    _save(_plain, {"targets": ("0",)}, tmp_path / "adapter")
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "does not record its base model (base_model_name_or_path); pass --base" in err


def test_finetune_records_the_model_as_given(tmp_path: Path, monkeypatch) -> None:
    from tiny_hf import sentiment_records, tiny_model, write_jsonl

    monkeypatch.chdir(tmp_path)
    tiny_model(tmp_path / "base", "bert-base")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(24))
    argv = ["finetune", "--model", "./base", "--task", "seq-cls", "--data", str(data),
            "--out", "run", "--max-steps", "1", "--threads", "1", "--progress", "none"]  # fmt: skip
    assert main(argv) == 0
    stored = _stored(tmp_path / "run" / "adapter")
    assert stored.name_or_path == "./base" and stored.task_type == "SEQ_CLS"
    run_labels = json.loads((tmp_path / "run" / "run.json").read_text())["labels"]
    assert stored.label_map == run_labels
