"""`finetune --quantize nf4 --optim adamw8bit --resume`: bitsandbytes' 8-bit optimizer state
goes into the checkpoint and comes back, so a run resumed after a crash ends where the
uninterrupted one does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import qlora_models
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_hf import completion_records, write_jsonl

from lorakit.cli import main
from lorakit.train.state import latest_checkpoint

STEPS, SAVE_AT = 6, 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qlora_models.llama_folder(tmp_path_factory.mktemp("models") / "llama")


def finetune(model: Path, data: Path, out: Path, *extra: str) -> int:
    return main([
        "finetune", "--model", str(model), "--data", str(data), "--out", str(out),
        "--batch-size", "4", "--max-steps", str(STEPS), "--save-every", str(SAVE_AT),
        "--keep-checkpoints", "5", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0",
        "--rank", "64",  # A and B of 64 x 64 = 4096 entries: bitsandbytes' 8-bit minimum
        "--threads", "1", "--progress", "none", *extra,
    ])  # fmt: skip


# optimizer -> (the first moment's key in the checkpoint, its safetensors dtype): the 8-bit
# state goes in as its uint8 codes (with their block scales), not widened
OPTIMIZERS = {
    "adamw8bit": ("optimizer.state.0.__bnb_optimizer_quant_state__.state1", "U8"),
    "paged_adamw": ("optimizer.state.0.__bnb_optimizer_quant_state__.state1", "F32"),
    "adamw": ("optimizer.state.0.exp_avg", "F32"),
}


@pytest.mark.parametrize(("optim", "state"), OPTIMIZERS.items(), ids=OPTIMIZERS)
def test_resumed_quantized_run_ends_as_the_uninterrupted_one(optim, state, llama_dir, tmp_path,
                                                             capsys):  # fmt: skip
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(32))
    flags = ("--quantize", "nf4", "--optim", optim)
    whole = tmp_path / "whole"
    assert finetune(llama_dir, data, whole, *flags) == 0
    first = whole / "checkpoints" / f"step-{SAVE_AT:08d}"
    key, dtype = state
    with safe_open(first / "state.safetensors", "pt") as f:
        assert f.get_slice(key).get_dtype() == dtype

    crashed = tmp_path / "crashed"  # killed after its step-3 checkpoint: nothing later exists
    shutil.copytree(first, crashed / "checkpoints" / first.name)
    assert latest_checkpoint(crashed) == crashed / "checkpoints" / first.name
    capsys.readouterr()
    assert finetune(llama_dir, data, crashed, *flags, "--resume", "--progress", "lines") == 0
    assert f"resuming from {crashed / 'checkpoints' / first.name}" in capsys.readouterr().err

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # it trained


def test_the_8bit_state_is_what_the_resumed_run_continues_from(llama_dir, tmp_path):
    """Scale the saved moments' block scales: the resumed run must then end elsewhere (the
    state is read back, not rebuilt)."""
    data = write_jsonl(tmp_path / "train.jsonl", completion_records(32))
    flags = ("--quantize", "nf4", "--optim", "adamw8bit")
    whole = tmp_path / "whole"
    assert finetune(llama_dir, data, whole, *flags) == 0
    first = whole / "checkpoints" / f"step-{SAVE_AT:08d}"
    crashed = tmp_path / "crashed"
    shutil.copytree(first, crashed / "checkpoints" / first.name)
    state = crashed / "checkpoints" / first.name / "state.safetensors"
    with safe_open(state, "pt") as f:
        metadata = f.metadata()  # the training state's format marker and layout
    tensors = load_file(state)
    scales = [k for k in tensors if k.startswith("optimizer.") and "absmax" in k]
    assert scales
    save_file({k: t * 10 if k in scales else t for k, t in tensors.items()}, state, metadata)
    assert finetune(llama_dir, data, crashed, *flags, "--resume") == 0
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-5
