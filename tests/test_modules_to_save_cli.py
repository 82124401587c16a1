"""`lorakit finetune --modules-to-save` with a name the model lacks fails before training."""

from __future__ import annotations

from pathlib import Path

from tiny_hf import sentiment_records, tiny_model, write_jsonl

from lorakit.cli import main


def test_modules_to_save_naming_no_module_exits_2_before_training(tmp_path: Path, capsys):
    model = tiny_model(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(20))
    argv = ["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"),
            "--max-steps", "1", "--modules-to-save", "nonexistent_head", "--threads", "1",
            "--progress", "lines"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lorakit finetune: error: modules_to_save=['nonexistent_head']" in err
    assert "matched no module of BertForSequenceClassification" in err
    assert not (tmp_path / "o" / "checkpoints").exists()
    assert not (tmp_path / "o" / "adapter").exists()
