"""Nothing lost: SIGKILL a real `lorakit finetune` process, `--resume`, get the same adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_state import complete_checkpoint
from tiny_hf import sentiment_records, tiny_model, write_jsonl

from lorakit.cli import main
from lorakit.train.distributed import DistEnv
from lorakit.train.report import read_metrics
from lorakit.train.state import latest_checkpoint, rng_state, set_rng_state

MAX_STEPS = 120


def _command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lorakit", "finetune",
        "--model", str(model), "--data", str(data), "--out", str(out),
        "--batch-size", "8", "--max-steps", str(MAX_STEPS), "--lr", "1e-3",
        "--dropout", "0.1",  # LoRA dropout (and the model's own): RNG state must resume too
        "--save-every", "5", "--eval-every", "40", "--log-every", "5",
        "--threads", "1", "--progress", "lines", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "bert", dropout=0.1)
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(160))

    whole = tmp_path / "whole"
    _in_process(_command(model, data, whole))  # the same options, parsed from the same argv

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        _command(model, data, crashed), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        last = latest_checkpoint(crashed)
        if last is not None and int(last.name.split("-")[1]) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (crashed / "adapter").exists()
    killed_at = int(latest_checkpoint(crashed).name.split("-")[1])
    assert 10 <= killed_at < MAX_STEPS

    resumed = subprocess.run(
        _command(model, data, crashed, "--resume"), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {crashed / 'checkpoints' / f'step-{killed_at:08d}'}" in resumed.stderr

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(crashed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("classifier" in k for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6
    # the adapter moved: this is a real comparison, not two untouched initialisations
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3

    # metrics.jsonl reads as one run: every step once, the crashed run's tail dropped
    steps = [r["step"] for r in read_metrics(crashed / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(5, MAX_STEPS + 1, 5))


def test_resume_ignores_a_half_written_checkpoint(tmp_path: Path) -> None:
    good = complete_checkpoint(tmp_path / "checkpoints" / "step-00000004")
    # what a crash during save leaves: a temporary folder, never a step-* name
    (tmp_path / "checkpoints" / ".tmp-step-00000008-1234").mkdir()
    (tmp_path / "checkpoints" / ".tmp-step-00000008-1234" / "state.json").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path) == good


def test_rng_state_round_trips() -> None:
    state = rng_state()
    first = (torch.rand(3), torch.randint(0, 100, (2,)))
    set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), first[0])
    assert DistEnv().world_size == 1


def test_resume_without_checkpoint_is_an_error_naming_out(tmp_path: Path, capsys) -> None:
    model = tiny_model(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_records(40))
    out = tmp_path / "out"
    cmd = _command(model, data, out, "--resume")
    code = main(cmd[cmd.index("finetune") :])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--resume: --out {out} holds no complete checkpoint to resume from" in err
    assert "eval before training" not in err and not (out / "adapter").exists()


def _in_process(cmd: list[str]) -> None:
    """Run `python -m lorakit finetune ...` (as built by _command) inside this process."""
    from lorakit.cli import build_parser
    from lorakit.cli.finetune import options_from_args
    from lorakit.train import finetune

    options, lora = options_from_args(build_parser().parse_args(cmd[cmd.index("finetune") :]))
    finetune(options, lora)
