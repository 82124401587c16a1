"""`lorakit finetune` with trainable tokens: the --trainable-tokens flag, a run that trains
the rows of tokens in its data, and a resumed run that ends where the whole one does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import build_parser
from lorakit.cli.finetune import options_from_args
from lorakit.train import TrainOptions, finetune


@pytest.mark.parametrize("flag, stored", [("3,7,42", (3, 7, 42)), ("5", (5,))])
def test_finetune_flag_reaches_the_config(flag: str, stored: tuple) -> None:
    args = build_parser().parse_args(["finetune", "--trainable-tokens", flag])
    assert options_from_args(args)[1].trainable_token_indices == stored


def test_finetune_flag_refuses_what_is_not_ids(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--trainable-tokens", "3,x"])
    assert "expected token ids separated by commas" in capsys.readouterr().err


def _causal_job(tmp_path) -> tuple[Path, Path, list[int]]:
    """A tiny Llama folder, a text file, and the ids of two words in every line of it."""
    from tiny_hf import tiny_model
    from transformers import AutoTokenizer

    folder = tiny_model(tmp_path / "model", "llama-causal")
    ids = AutoTokenizer.from_pretrained(folder)("word and", add_special_tokens=False)["input_ids"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "word {i} and word {i + 1}"}}\n' for i in range(16)))
    return folder, data, ids


def test_finetune_trains_the_rows_of_tokens_in_the_data(tmp_path) -> None:
    folder, data, ids = _causal_job(tmp_path)
    options = TrainOptions(model=str(folder), data=str(data), task="causal-lm", max_steps=2,
                           out=str(tmp_path / "out"), lr=1e-2, eval_fraction=0.25,
                           progress="none")  # fmt: skip
    unused = 1  # [unused0]: never in the data, so its row keeps its value
    config = lorakit.LoraConfig(rank=2, targets=("q_proj",), trainable_token_indices=[*ids, unused])
    finetune(options, config)
    saved = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    base = load_file(folder / "model.safetensors")["model.embed_tokens.weight"][[*ids, unused]]
    assert (rows != base).any(dim=1).tolist() == [True] * len(ids) + [False]


def test_finetune_resume_gives_the_uninterrupted_rows(tmp_path) -> None:
    """Resuming from the step-2 checkpoint of a 4-step run ends at that run's adapter."""
    folder, data, ids = _causal_job(tmp_path)
    config = lorakit.LoraConfig(rank=2, targets=("q_proj",), trainable_token_indices=ids)
    options = dict(model=str(folder), data=str(data), task="causal-lm", lr=1e-2, max_steps=4,
                   save_every=2, batch_size=4, eval_fraction=0.25, progress="none")  # fmt: skip
    finetune(TrainOptions(**options, out=str(tmp_path / "whole")), config)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "adapter")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    finetune(TrainOptions(**options, out=str(tmp_path / "resumed"), resume=True), config)
    whole, resumed = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors")
                      for d in ("whole", "resumed"))  # fmt: skip
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert whole.keys() == resumed.keys() and key in whole
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    base = load_file(folder / "model.safetensors")["model.embed_tokens.weight"][ids]
    assert (whole[key] != base).any(dim=1).all()  # the rows moved: a real comparison


def test_the_new_tokens_example_runs():
    """examples/new_tokens.py: trains only the new rows and reloads to the same logits."""
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "new_tokens.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rows changed: [126, 127]" in done.stdout
    assert "the reloaded adapter gives the same logits: True" in done.stdout
