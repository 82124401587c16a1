"""`lorakit finetune` at the command line: the demo default, options, and clear errors."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_hf import sentiment_records, tiny_model, write_jsonl

from lorakit.cli import build_parser, main
from lorakit.cli.finetune import options_from_args
from lorakit.train import TrainOptions


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "bert")


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["finetune", *argv, "--threads", "1", "--progress", "lines"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_defaults_mirror_train_options_and_lora_config() -> None:
    options, lora = options_from_args(build_parser().parse_args(["finetune"]))
    assert options == TrainOptions()  # no arguments: the embedded demo job
    assert (lora.rank, lora.alpha, lora.targets) == (8, 16.0, "all-linear")
    assert lora.modules_to_save == ()  # finetune adds the classification head itself


def test_lora_options_reach_the_config() -> None:
    argv = ["finetune", "--rank", "4", "--alpha", "8", "--targets", "query,value",
            "--modules-to-save", "classifier", "--use-rslora", "--dropout", "0.1",
            "--use-dora"]  # fmt: skip
    _, lora = options_from_args(build_parser().parse_args(argv))
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ("query", "value"))
    assert lora.modules_to_save == ("classifier",) and lora.use_rslora and lora.dropout == 0.1
    assert lora.use_dora


def test_padding_and_truncation_options_reach_train_options() -> None:
    argv = ["finetune", "--padding", "max-length", "--truncation-side", "left"]
    options, _ = options_from_args(build_parser().parse_args(argv))
    assert (options.padding, options.truncation_side) == ("max-length", "left")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--padding", "max_length"], "argument --padding: invalid choice: 'max_length'"),
        (["--truncation-side", "middle"], "argument --truncation-side: invalid choice: 'middle'"),
    ],
)
def test_bad_padding_or_truncation_side_is_refused(capsys, argv: list, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_max_length_padding_and_left_truncation_end_to_end(
    tmp_path: Path, bert_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    finetune_module = importlib.import_module("lorakit.train.finetune")  # not the function
    # Record the shapes of the batches the real loop trains and evaluates on.
    widths: set[int] = set()
    real_train = finetune_module.train

    def train(model, train_data, eval_data, options, *, collate_fn, **kw):
        def collate(examples):
            batch = collate_fn(examples)
            widths.add(batch["input_ids"].shape[1])
            return batch

        return real_train(model, train_data, eval_data, options, collate_fn=collate, **kw)

    monkeypatch.setattr(finetune_module, "train", train)
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(40))
    code, _, err = _run(
        capsys, "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o"),
        "--max-steps", "2", "--max-length", "24", "--padding", "max-length",
        "--truncation-side", "left",
    )  # fmt: skip
    assert code == 0, err
    assert widths == {24}
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["options"]["padding"] == "max-length"
    assert run["options"]["truncation_side"] == "left"


def test_the_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The real default (MiniLM-L6 + VADER words), cut to 2 steps to keep the suite fast.
    code, out, err = _run(capsys, "--out", str(tmp_path / "demo"), "--max-steps", "2")
    assert code == 0, err
    assert "eval before training" in err
    for row in ("trainable params", "eval accuracy", "majority baseline  0.5000", "tokens/s"):
        assert row in out
    run = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert run["task"] == "seq-cls" and run["labels"] == {"negative": 0, "positive": 1}
    assert (tmp_path / "demo" / "data" / "train.jsonl").is_file()
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()


def test_custom_model_and_data(tmp_path: Path, bert_dir: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "train.csv.jsonl", sentiment_records(40))
    code, out, err = _run(
        capsys, "--model", str(bert_dir), "--data", str(data), "--out", str(tmp_path / "o"),
        "--max-steps", "3", "--targets", "query,value", "--rank", "4",
    )  # fmt: skip
    assert code == 0, err
    assert "adapted layers     4 (+ 1 in full)" in out  # 2 layers x (query, value); the head
    config = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["modules_to_save"] == ["classifier"]


def _error(capsys, tmp_path: Path, *argv: str) -> str:
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 2
    assert not (tmp_path / "out" / "checkpoints").exists()  # failed before training
    return err


def test_model_folder_without_config(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    err = _error(capsys, tmp_path, "--model", str(tmp_path / "empty"))
    assert "has no config.json" in err and str(tmp_path / "empty") in err


def test_model_folder_missing(tmp_path: Path, capsys) -> None:
    err = _error(capsys, tmp_path, "--model", str(tmp_path / "nope"))
    assert "does not exist" in err


def test_task_that_cannot_be_inferred(tmp_path: Path, capsys) -> None:
    bare = tiny_model(tmp_path / "bare", "bert-base")  # architectures: ["BertModel"]
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(20))
    err = _error(capsys, tmp_path, "--model", str(bare), "--data", str(data))
    assert "cannot infer the task" in err and "--task" in err


def test_unknown_task_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--task", "translation"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'translation'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"label": "pos"}\n', r"train.jsonl, line 1: missing field 'text'"),
        ("", r"train.jsonl: file is empty"),
        ('{"text": "ok", "label": "pos"}\nnot json\n', r"train.jsonl, line 2: invalid JSON"),
    ],
)
def test_bad_data_names_file_line_and_field(
    tmp_path: Path, bert_dir: Path, capsys, content: str, message: str
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    err = _error(capsys, tmp_path, "--model", str(bert_dir), "--data", str(data))
    assert re.search(message, err), err


def test_label_unseen_in_training(tmp_path: Path, bert_dir: Path, capsys) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_records(20))
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": "so so", "label": "neutral"}])
    err = _error(
        capsys, tmp_path, "--model", str(bert_dir), "--data", str(train),
        "--eval-file", str(held),
    )  # fmt: skip
    assert "eval.jsonl, line 1: label 'neutral' does not occur in the training data" in err


def test_python_dash_m_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lorakit", "finetune", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for flag in ("--resume", "--save-every", "--grad-accum", "--fsdp", "--modules-to-save"):
        assert flag in done.stdout
    assert "--debug-dump-params" not in done.stdout  # a test hook, hidden
    # Each option states its default at most once (no "(default: x) (default: None)").
    options = re.split(r"\n  (?=-)", done.stdout.split("options:", 1)[1])
    assert len(options) > 30
    for option in options:
        assert option.count("(default:") <= 1, option
    assert "(default: None)" not in done.stdout
    for shown in ("--padding {longest,max-length}", "--truncation-side {right,left}"):
        assert shown in done.stdout
    assert "(default: 128)" in done.stdout and "(default: the demo's MiniLM-L6)" in done.stdout
