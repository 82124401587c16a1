"""Shared set-up for the torchrun tests: tiny float64 model, data, and real runs.

float64 throughout: in float32, Adam turns the rounding of all-reduced vs single-process
gradient sums (a different summation order) into update differences above 1e-5.
"""

from __future__ import annotations

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


def shared_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(folder, model, data), made once per test session and reused by every file."""
    tmp = tmp_path_factory.getbasetemp() / "dist-shared"
    model, data = tmp / "bert64", tmp / "train.jsonl"
    if not data.exists():
        tiny_model(model, dtype=torch.float64)
        write_jsonl(data, sentiment_records(72))
    return tmp, model, data


def single_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one process on the global batch (run once per session)."""
    tmp, model, data = shared_inputs(tmp_path_factory)
    out = tmp / "one"
    if not (out / "dump" / "rank0.pt").exists():
        done = single(args(model, data, out, PER_RANK_BATCH * WORLD))
        assert done.returncode == 0, done.stderr[-3000:]
    return out


def args(
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


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(argv: list[str]) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 <argv>`, from this interpreter's venv."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [exe, "--standalone", "--nproc_per_node", str(WORLD), *argv]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def single(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], env=_env(), capture_output=True, text=True)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
