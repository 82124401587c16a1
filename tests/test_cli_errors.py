"""The CLI's answer to bad input: one line naming the problem, exit code 2, nothing destroyed."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
from tiny_hf import sentiment_records, tiny_model, write_jsonl

import lorakit
from lorakit.cli import main


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="module")
def adapter_dir(bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter saved from the model in bert_dir (no task info: merge reads its config)."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(bert_dir)
    lorakit.inject(model, lorakit.LoraConfig(targets=("query",)))
    return lorakit.save_adapter(model, tmp_path_factory.mktemp("adapters") / "a")


def _one_error(capsys: pytest.CaptureFixture, command: str, argv: list[str]) -> str:
    """Run the CLI, expecting exit 2 and a single `lorakit <command>: error:` line."""
    capsys.readouterr()
    assert main([command, *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"lorakit {command}: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _finetune(capsys, out: Path, *argv: str) -> str:
    flags = ["--out", str(out), "--max-steps", "1", "--threads", "1", "--progress", "none"]
    line = _one_error(capsys, "finetune", [*argv, *flags])
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()
    return line


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("deep.jsonl", "[" * 100_000 + "]" * 100_000, r"deep\.jsonl, line 2: JSON nested too"),
        ("big.jsonl", '{"text": "a", "label": ' + "7" * 5000 + "}", r"big\.jsonl, line 2: .*4300"),
        ("one.jsonl", '{"text": "a b", "label": "pos"}', r"one\.jsonl: field 'label' has 1"),
    ],
)
def test_finetune_bad_data_lines(tmp_path, bert_dir, capsys, name, content, message) -> None:
    data = tmp_path / name
    data.write_text('{"text": "good day", "label": "pos"}\n' + content + "\n")
    line = _finetune(capsys, tmp_path / "out", "--model", str(bert_dir), "--data", str(data),
                     "--eval-fraction", "0.5")  # fmt: skip
    assert re.search(message, line), line


def test_finetune_label_set_that_does_not_fit_the_head(tmp_path, bert_dir, capsys) -> None:
    records = sentiment_records(12)
    for r in records[::3]:
        r["label"] = "meh"
    data = write_jsonl(tmp_path / "three.jsonl", records)
    line = _finetune(capsys, tmp_path / "out", "--model", str(bert_dir), "--data", str(data))
    assert f"{bert_dir / 'config.json'}: the checkpoint's classification head has 2 labels" in line
    assert "the training data has 3 ('meh', 'neg', 'pos')" in line


def test_finetune_model_without_tokenizer_files(tmp_path, bert_dir, capsys) -> None:
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / name, bare / name)
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(10))
    line = _finetune(capsys, tmp_path / "out", "--model", str(bare), "--data", str(data))
    assert f"model folder '{bare}' has no tokenizer files (none of tokenizer.json" in line


@pytest.fixture
def garbage_model(tmp_path: Path, bert_dir: Path) -> Path:
    folder = shutil.copytree(bert_dir, tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"not safetensors at all" * 4)
    return folder


def test_finetune_garbage_weights(tmp_path, garbage_model, capsys) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(10))
    line = _finetune(capsys, tmp_path / "out", "--model", str(garbage_model), "--data", str(data))
    assert f"{garbage_model / 'model.safetensors'} is not a readable safetensors file" in line


def test_merge_garbage_weights(tmp_path, garbage_model, adapter_dir, capsys) -> None:
    argv = ["--base", str(garbage_model), "--adapter", str(adapter_dir)]
    line = _one_error(capsys, "merge", [*argv, "--out", str(tmp_path / "merged")])
    assert f"{garbage_model / 'model.safetensors'} is not a readable safetensors file" in line
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))


def test_merge_into_a_parent_that_is_a_file(tmp_path, bert_dir, adapter_dir, capsys) -> None:
    (tmp_path / "file").write_text("keep me")
    argv = ["--base", str(bert_dir), "--adapter", str(adapter_dir)]
    line = _one_error(capsys, "merge", [*argv, "--out", str(tmp_path / "file" / "merged")])
    assert f"cannot write --out {tmp_path / 'file' / 'merged'}" in line
    assert (tmp_path / "file").read_text() == "keep me"


def test_merge_into_a_read_only_parent(tmp_path, bert_dir, adapter_dir, capsys, monkeypatch):
    # Tests may run as root, where chmod does not stop writes: refuse them at the source.
    parent = tmp_path / "read-only"
    parent.mkdir()
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args, **kwargs) -> None:
        if self.parent == parent:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    argv = ["--base", str(bert_dir), "--adapter", str(adapter_dir)]
    line = _one_error(capsys, "merge", [*argv, "--out", str(parent / "merged")])
    assert line.endswith(f"cannot write --out {parent / 'merged'}: Permission denied")
    assert list(parent.iterdir()) == []


def test_finetune_without_matplotlib_skips_the_plot(tmp_path, bert_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(12))
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(bert_dir), "--data", str(data), "--out", str(out),
            "--max-steps", "1", "--threads", "1", "--progress", "none"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "matplotlib is not installed, so no training.png was drawn" in printed.err
    assert "none (no matplotlib)" in printed.out  # the summary names no plot file
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "training.png").exists()
