"""Real `torchrun` DDP runs on CPU (gloo): every rank ends where one process ends.

(Resume under torchrun is tested with FSDP in test_fsdp.py, and resume of the same
single-process/DDP state code after SIGKILL in test_resume.py.)
"""

from __future__ import annotations

import json

import pytest
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


def test_ddp_ranks_agree_and_match_one_process(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp, model, data = shared_inputs(tmp_path_factory)
    out = tmp / "ddp"
    ddp = torchrun(args(model, data, out, PER_RANK_BATCH))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = single_reference(tmp_path_factory)

    rank0, rank1 = load(out / "dump" / "rank0.pt"), load(out / "dump" / "rank1.pt")
    single = load(one / "dump" / "rank0.pt")
    assert max_diff(rank0, rank1) == 0.0  # DDP keeps replicas identical
    assert max_diff(rank0, single) <= 1e-5  # same global batch, same data order
    # training really moved the adapter (B starts at zero)
    assert max(t.abs().max().item() for k, t in single.items() if k.endswith("lora_B")) > 1e-3

    # sharded evaluation (sums all-reduced) gives the single-process numbers
    ddp_run = json.loads((out / "run.json").read_text())
    one_run = json.loads((one / "run.json").read_text())
    assert ddp_run["eval_before"] == pytest.approx(one_run["eval_before"], abs=1e-6)
    assert ddp_run["eval_after"] == pytest.approx(one_run["eval_after"], abs=1e-6)
    assert ddp_run["tokens"] == one_run["tokens"]  # all ranks' tokens counted, once

    # rank 0 alone wrote files and printed the summary
    assert ddp.stdout.count("trainable params") == 1
    assert "2 process(es)" in ddp.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000002", f"step-{STEPS:08d}"]


def test_ddp_syncs_only_the_adapter_gradients(tmp_path) -> None:
    import torch.distributed as dist
    from torch import nn

    import lorakit
    from lorakit.train.distributed import DistEnv, wrap_model

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=["0"]))
        # a one-process group stands in for torchrun's; DistEnv says "distributed" to get DDP
        ddp = wrap_model(model, DistEnv(rank=0, world_size=2))
        synced = ddp._get_ddp_logging_data()  # what DDP's reducer registered for all-reduce
        assert synced["num_parameter_tensors"] == 2  # lora_A and lora_B, no base weights
        assert synced["total_parameter_size_bytes"] == (2 * 64 + 64 * 2) * 4
    finally:
        dist.destroy_process_group()
