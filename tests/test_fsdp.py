"""FSDP2 (`fully_shard`) under a real `torchrun` on CPU (gloo): same result as one process,
adapter saved from all-gathered shards, and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import (
    PER_RANK_BATCH,
    STEPS,
    WORLD,
    _args,
    _load,
    _max_diff,
    _single,
    _torchrun,
)
from tiny_hf import sentiment_records, tiny_model, write_jsonl

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed.fsdp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    model = tiny_model(tmp / "bert64", dtype=torch.float64)
    data = write_jsonl(tmp / "train.jsonl", sentiment_records(72))
    fsdp = _torchrun(_args(model, data, tmp / "fsdp", PER_RANK_BATCH, "--fsdp"))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    one = _single(_args(model, data, tmp / "one", PER_RANK_BATCH * WORLD))
    assert one.returncode == 0, one.stderr[-3000:]
    first = _torchrun(_args(model, data, tmp / "resume", PER_RANK_BATCH, "--fsdp", steps=STEPS - 1))
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun(_args(model, data, tmp / "resume", PER_RANK_BATCH, "--fsdp", "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr
    return tmp


def test_fsdp_matches_one_process(runs: Path) -> None:
    sharded = _load(runs / "fsdp" / "dump" / "rank0.pt")  # a full state dict, gathered
    single = _load(runs / "one" / "dump" / "rank0.pt")
    assert _max_diff(sharded, single) <= 1e-5
    assert max(t.abs().max().item() for k, t in single.items() if k.endswith("lora_B")) > 1e-3


def test_fsdp_adapter_file_holds_the_full_tensors(runs: Path) -> None:
    a = load_file(runs / "fsdp" / "adapter" / "adapter_model.safetensors")
    b = load_file(runs / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # not a shard
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def test_fsdp_resume_continues(runs: Path) -> None:
    resumed = _load(runs / "resume" / "dump" / "rank0.pt")
    whole = _load(runs / "fsdp" / "dump" / "rank0.pt")
    assert _max_diff(resumed, whole) <= 1e-6
