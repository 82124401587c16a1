"""`lorakit finetune --quantize ... --init loftq`: LoftQ from the float weights in the model
folder, and the float weights read lazily by module path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import qlora_models
import torch
from safetensors.torch import load_file, save_file
from tiny_hf import completion_records, write_jsonl

from lorakit.cli import main
from lorakit.train.loftq_weights import FolderWeights


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.llama_folder(tmp_path_factory.mktemp("models") / "llama")


def finetune(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    common = ("--threads", "1", "--progress", "none", "--max-steps", "2", "--eval-every", "0")
    code = main(["finetune", *argv, *common])
    return code, capsys.readouterr().err


# (quantize, init, whether B starts from LoftQ): a kaiming B starts at zero and moves by about
# lr per step (Adam), LoftQ's B holds the root of the error's singular values
RUNS = {"nf4-kaiming": ("nf4", "kaiming", False), "nf4-loftq": ("nf4", "loftq", True),
        "int8-loftq": ("int8", "loftq", True)}  # fmt: skip


@pytest.mark.parametrize(("quantize", "init", "fitted"), RUNS.values(), ids=RUNS)
def test_finetune_with_loftq_on_a_quantized_base(quantize, init, fitted, llama_dir, tmp_path,
                                                 capsys):  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(16))
    out = tmp_path / "out"
    flags = ("--quantize", quantize, "--init", init, "--rank", "4", "--lr", "1e-4")
    code, err = finetune(capsys, "--model", str(llama_dir), "--data", str(data), "--out",
                         str(out), *flags)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["lora"]["init"] == init
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    largest_b = max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k)
    assert (largest_b > 1e-2) == fitted, largest_b


def test_finetune_refuses_loftq_without_quantize(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(16))
    code, err = finetune(capsys, "--model", str(llama_dir), "--data", str(data), "--out",
                         str(tmp_path / "out"), "--init", "loftq")  # fmt: skip
    assert code == 2
    assert "init='loftq' fits the adapter to the quantized base's rounding error" in err


def test_folder_weights_read_by_path_and_without_the_task_prefix(tmp_path):
    save_file({"encoder.w": torch.ones(2), "bert.x": torch.zeros(3)}, tmp_path / "a.safetensors")
    weights = FolderWeights(tmp_path, prefix="bert")
    assert torch.equal(weights["bert.encoder.w"], torch.ones(2))  # saved from the bare model
    assert torch.equal(weights["bert.x"], torch.zeros(3))
    assert "bert.encoder.w" in weights and "missing" not in weights
    assert weights.get("missing") is None and len(weights) == 2
    with pytest.raises(KeyError, match="missing"):
        weights["missing"]
