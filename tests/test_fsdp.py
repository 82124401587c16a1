"""FSDP2 (`fully_shard`) under a real `torchrun` on CPU (gloo): stopped after 2 steps and
resumed to 3, it ends where one process ends, with full tensors in the adapter file; with
gradient accumulation (synchronised once per step) it ends there too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_runs import (
    PER_RANK_BATCH,
    STEPS,
    args,
    load,
    max_diff,
    shared_inputs,
    single_reference,
    torchrun,
)
from safetensors.torch import load_file

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp")


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp, model, data = shared_inputs(tmp_path_factory)
    out = tmp / "fsdp"
    first = torchrun(args(model, data, out, PER_RANK_BATCH, "--fsdp", steps=STEPS - 1))
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun(args(model, data, out, PER_RANK_BATCH, "--fsdp", "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'}" in again.stderr
    return out


def test_fsdp_then_resume_matches_one_process(
    fsdp_out: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    one = single_reference(tmp_path_factory)
    sharded = load(fsdp_out / "dump" / "rank0.pt")  # a full state dict, gathered to rank 0
    single = load(one / "dump" / "rank0.pt")
    assert max_diff(sharded, single) <= 1e-5
    assert max(t.abs().max().item() for k, t in single.items() if k.endswith("lora_B")) > 1e-3


def test_fsdp_adapter_file_holds_the_full_tensors(
    fsdp_out: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    one = single_reference(tmp_path_factory)
    a = load_file(fsdp_out / "adapter" / "adapter_model.safetensors")
    b = load_file(one / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # not a shard
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize("fsdp", [True, False], ids=["fsdp", "ddp"])
def test_gradient_accumulation_matches_one_process(
    fsdp: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """2 ranks x 2 micro-batches x 2 examples (synchronised on the last micro-batch only) =
    the single process's 8 examples per step."""
    tmp, model, data = shared_inputs(tmp_path_factory)
    out = tmp / f"accum-{'fsdp' if fsdp else 'ddp'}"
    extra = ("--grad-accum", "2", *(("--fsdp",) if fsdp else ()))
    done = torchrun(args(model, data, out, PER_RANK_BATCH // 2, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    one = single_reference(tmp_path_factory)
    assert max_diff(load(out / "dump" / "rank0.pt"), load(one / "dump" / "rank0.pt")) <= 1e-5
