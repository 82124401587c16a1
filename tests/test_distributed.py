"""Real `torchrun` runs on CPU (gloo): DDP (and FSDP2) end where one process ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import sentiment_records, tiny_model, write_jsonl

STEPS = 3
PER_RANK_BATCH = 4
WORLD = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    # float64: Adam would turn float32 rounding of all-reduced vs single-process gradient
    # sums (a different summation order) into update differences above 1e-5.
    model = tiny_model(tmp / "bert64", dtype=torch.float64)
    data = write_jsonl(tmp / "train.jsonl", sentiment_records(72))
    return tmp, model, data


def _args(
    model: Path, data: Path, out: Path, batch: int, *extra: str, steps: int = STEPS
) -> list[str]:
    # constant lr: a run stopped at step 2 and resumed to step 3 follows the same schedule
    return [
        "-m", "lorakit", "finetune", "--model", str(model), "--data", str(data),
        "--out", str(out), "--batch-size", str(batch), "--max-steps", str(steps),
        "--lr", "1e-2", "--warmup-steps", "0", "--schedule", "constant", "--dtype", "base",
        "--eval-every", "2", "--save-every", "2", "--log-every", "1", "--progress", "lines",
        "--debug-dump-params", str(out / "dump"), *extra,
    ]  # fmt: skip


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(WORLD), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _single(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_ddp_ranks_agree_and_match_one_process(setup: tuple[Path, Path, Path]) -> None:
    tmp, model, data = setup
    ddp = _torchrun(_args(model, data, tmp / "ddp", PER_RANK_BATCH))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = _single(_args(model, data, tmp / "one", PER_RANK_BATCH * WORLD))
    assert one.returncode == 0, one.stderr[-3000:]

    rank0 = _load(tmp / "ddp" / "dump" / "rank0.pt")
    rank1 = _load(tmp / "ddp" / "dump" / "rank1.pt")
    single = _load(tmp / "one" / "dump" / "rank0.pt")
    assert _max_diff(rank0, rank1) == 0.0  # DDP keeps replicas identical
    assert _max_diff(rank0, single) <= 1e-5  # same global batch, same data order
    # training really moved the adapter (B starts at zero)
    assert max(t.abs().max().item() for k, t in single.items() if k.endswith("lora_B")) > 1e-3

    # sharded evaluation (sums all-reduced) gives the single-process numbers
    ddp_run = json.loads((tmp / "ddp" / "run.json").read_text())
    one_run = json.loads((tmp / "one" / "run.json").read_text())
    assert ddp_run["eval_before"] == pytest.approx(one_run["eval_before"], abs=1e-6)
    assert ddp_run["eval_after"] == pytest.approx(one_run["eval_after"], abs=1e-6)
    assert ddp_run["tokens"] == one_run["tokens"]  # all ranks' tokens counted, once

    # rank 0 alone wrote files and printed the summary
    assert ddp.stdout.count("trainable params") == 1
    assert "2 process(es)" in ddp.stdout
    assert (tmp / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp / "ddp" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]


def test_ddp_resume_continues_where_it_stopped(setup: tuple[Path, Path, Path]) -> None:
    tmp, model, data = setup
    out = tmp / "ddp-resume"
    first = _torchrun(_args(model, data, out, PER_RANK_BATCH, steps=STEPS - 1))
    assert first.returncode == 0, first.stderr[-3000:]
    again = _torchrun(_args(model, data, out, PER_RANK_BATCH, "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-00000002'}" in again.stderr
    a, b = _load(out / "dump" / "rank0.pt"), _load(out / "dump" / "rank1.pt")
    assert _max_diff(a, b) == 0.0
    if not (tmp / "ddp" / "dump" / "rank0.pt").exists():
        pytest.skip("needs the uninterrupted run of test_ddp_ranks_agree_and_match_one_process")
    assert _max_diff(a, _load(tmp / "ddp" / "dump" / "rank0.pt")) <= 1e-6
