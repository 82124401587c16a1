"""Checkpoint state files (no pickle), pruning, and the checks of --out before a run."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_hf import sentiment_records, tiny_model, write_jsonl
from torch import nn

from lorakit.cli import main
from lorakit.errors import CheckpointError, ConfigError
from lorakit.train import TrainOptions
from lorakit.train.distributed import DistEnv
from lorakit.train.state import (
    Position,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
)
from lorakit.train.state_format import read_state, write_state


def complete_checkpoint(folder: Path) -> Path:
    """A `step-*` folder with every file a complete checkpoint has (contents not read)."""
    (folder / "adapter").mkdir(parents=True)
    for name in ("state.json", "state.safetensors", "adapter/adapter_config.json"):
        (folder / name).write_text("{}")
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    return folder


def _fake_adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")


# -- the state format ---------------------------------------------------------------------
def _adamw_state() -> dict:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return optimizer.state_dict()


def _same(a: object, b: object) -> bool:
    """Equal in value and type, all the way down (tuples stay tuples, int keys ints)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) and type(k) is type(kb)
                                          for k, kb in zip(a, b))  # fmt: skip
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(_adamw_state(), id="adamw-int-keys-tensor-step"),
        pytest.param(
            {
                "state": {"l.lora_A.weight": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
                "param_groups": [{"params": ["l.lora_A.weight"], "betas": (0.9, 0.99)}],
            },
            id="fsdp-fqn-keys",
        ),
        pytest.param([rng_state(), rng_state()], id="per-rank-rng"),
        pytest.param({"eval": {"accuracy": float("nan")}, "inf": -math.inf}, id="non-finite"),
        pytest.param({"__tensor__": "x", "__tuple__": [1]}, id="keys-that-look-like-tags"),
        pytest.param({"t": torch.zeros(0, dtype=torch.bfloat16), "s": torch.tensor(7)}, id="odd"),
    ],
)
def test_state_files_round_trip_exactly(tmp_path: Path, value: dict) -> None:
    write_state(tmp_path, {"v": value})
    assert _same(read_state(tmp_path)["v"], value)


def test_state_files_hold_no_pickle(tmp_path: Path) -> None:
    write_state(tmp_path, {"rng": rng_state(), "optimizer": _adamw_state()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    doc = json.loads((tmp_path / "state.json").read_text())
    python = doc["state"]["rng"]["python"]["__tuple__"]
    assert python[0] == random.getstate()[0] and len(python[1]["__tuple__"]) == 625
    assert doc["state"]["optimizer"]["state"]["__dict__"][0][1]["step"] == {
        "__tensor__": "optimizer.state.0.step"
    }


def test_a_value_json_cannot_hold_is_refused_on_save(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot store object at opt\.x in a checkpoint"):
        write_state(tmp_path, {"opt": {"x": object()}})


# -- save and resume -----------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.frozen(x)))


def _setup() -> tuple[_Tiny, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    model = _Tiny()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))


def _steps(model: nn.Module, optimizer, scheduler, n: int) -> None:
    for _ in range(n):  # dropout and the data draw from the torch RNG: it must resume too
        model(torch.randn(8, 4) + random.random()).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _save(out: Path, step: int, model, optimizer, scheduler, keep: int = 2) -> Path:
    return save_checkpoint(
        out, DistEnv(), Position(step, 0, step), model, optimizer, scheduler,
        {"tokens": 123, "eval_before": {"accuracy": 0.5}}, _fake_adapter, keep=keep,
    )  # fmt: skip


def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    _steps(model, optimizer, scheduler, 3)
    folder = _save(tmp_path, 3, model, optimizer, scheduler)
    _steps(model, optimizer, scheduler, 3)
    whole = model.head.weight.detach().clone()

    random.seed(99)  # the resumed run must not see these streams
    torch.manual_seed(99)
    model2, optimizer2, scheduler2 = _setup()
    position, state = load_checkpoint(folder, DistEnv(), model2, optimizer2, scheduler2)
    assert position == Position(3, 0, 3) and state["tokens"] == 123
    assert state["eval_before"] == {"accuracy": 0.5} and state["world_size"] == 1
    _steps(model2, optimizer2, scheduler2, 3)
    assert torch.equal(model2.head.weight, whole)
    assert model2.head.weight.abs().sum() > 0 and not torch.equal(whole, _Tiny().head.weight)


def test_a_state_that_does_not_fit_is_refused_before_the_model_changes(tmp_path: Path) -> None:
    model, optimizer, scheduler = _setup()
    folder = _save(tmp_path, 1, model, optimizer, scheduler)
    other = nn.Linear(4, 3)
    optimizer2 = torch.optim.AdamW(other.parameters())
    before = other.weight.detach().clone()
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0)
    with pytest.raises(CheckpointError, match=rf"checkpoint {folder} does not fit the model"):
        load_checkpoint(folder, DistEnv(), other, optimizer2, scheduler2)
    assert torch.equal(other.weight, before)


# -- files nobody should trust -------------------------------------------------------------
class _Exploit:
    """A pickle that, when loaded, creates `marker`: what a planted state.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_with_pickle(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A checkpoint whose `name` file is a malicious pickle; (folder, marker)."""
    model, optimizer, scheduler = _setup()
    folder = _save(tmp_path / "out", 1, model, optimizer, scheduler)
    marker = tmp_path / "pwned"
    if name == "state.pt":  # the legacy layout: state.pt instead of the two state files
        (folder / "state.json").unlink()
        (folder / "state.safetensors").unlink()
    torch.save(_Exploit(marker), folder / name)
    return folder, marker


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("state.pt", r"is a pickle .* lorakit does not load it"),
        ("state.json", "is not valid JSON"),
        ("state.safetensors", "is not a readable safetensors file"),
    ],
)
def test_a_planted_pickle_is_never_run(tmp_path: Path, name: str, message: str) -> None:
    folder, marker = _checkpoint_with_pickle(tmp_path, name)
    assert latest_checkpoint(tmp_path / "out") == folder  # it is found, then refused
    model, optimizer, scheduler = _setup()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / name))} {message}"):
        load_checkpoint(folder, DistEnv(), model, optimizer, scheduler)
    assert not marker.exists()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _json_edit(**changes: object):
    def edit(path: Path) -> None:
        doc = json.loads(path.read_text())
        doc.update(changes)
        path.write_text(json.dumps(doc))

    return edit


def _drop_key(key: str):
    def edit(path: Path) -> None:
        doc = json.loads(path.read_text())
        del doc["state"][key]
        path.write_text(json.dumps(doc))

    return edit


JSON, TENSORS = "state.json", "state.safetensors"


@pytest.mark.parametrize(
    ("damaged", "named", "damage", "message"),
    [
        (JSON, JSON, _truncate, "is not valid JSON"),
        (JSON, JSON, lambda p: p.write_bytes(b"\x00\xff garbage"), "is not valid JSON"),
        (JSON, JSON, lambda p: p.write_text("[1, 2]"), "is not a lorakit training state"),
        (JSON, JSON, _json_edit(version=99), "has version 99; this lorakit reads version 1"),
        (JSON, JSON, _json_edit(state={"x": {"__tensor__": "nope"}}), "is damaged: .*'nope'"),
        (JSON, JSON, _drop_key("position"), r"lacks \['position'\]"),
        (JSON, TENSORS, _drop_key("model"), "holds tensors .* does not name"),
        (JSON, JSON, lambda p: p.unlink(), "does not exist"),
        (TENSORS, TENSORS, _truncate, "is not a readable safetensors file"),
        (TENSORS, TENSORS, lambda p: p.write_bytes(b"garbage!" * 4), "is not a readable"),
        (TENSORS, TENSORS, lambda p: save_file({"w": torch.ones(2)}, p), "is not a lorakit"),
        (TENSORS, TENSORS, lambda p: p.unlink(), "does not exist"),
    ],
)
def test_a_damaged_or_foreign_state_file_is_an_error_naming_it(
    tmp_path: Path, damaged: str, named: str, damage, message: str
) -> None:
    model, optimizer, scheduler = _setup()
    _steps(model, optimizer, scheduler, 1)
    folder = _save(tmp_path, 1, model, optimizer, scheduler)
    damage(folder / damaged)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(folder / named))} {message}"):
        read_checkpoint(folder)


# -- pruning ------------------------------------------------------------------------------
def test_incomplete_step_folders_are_not_checkpoints(tmp_path: Path) -> None:
    good = complete_checkpoint(tmp_path / "checkpoints" / "step-00000004")
    # what a kill during rmtree of an old checkpoint left before: state files, no adapter
    torn = tmp_path / "checkpoints" / "step-00000008"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"old")
    no_tensors = complete_checkpoint(tmp_path / "checkpoints" / "step-00000012")
    (no_tensors / "state.safetensors").unlink()
    assert latest_checkpoint(tmp_path) == good
    (no_tensors / "state.safetensors").write_text("{}")
    assert latest_checkpoint(tmp_path) == no_tensors


def test_a_kill_while_pruning_leaves_no_step_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, optimizer, scheduler = _setup()
    _save(tmp_path, 1, model, optimizer, scheduler, keep=1)
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors: bool = False) -> None:
        path = Path(path)
        if path.is_dir() and (path / "adapter").is_dir():
            real_rmtree(path / "adapter")  # the deletion got this far
            raise KeyboardInterrupt  # as good as SIGKILL for the files left behind
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr("lorakit.train.state.shutil.rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, optimizer, scheduler, keep=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f".trash-step-00000001-{os.getpid()}", "step-00000002"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000002"

    monkeypatch.undo()  # the next save sweeps the trash and anything incomplete
    (tmp_path / "checkpoints" / "step-00000000").mkdir()
    _save(tmp_path, 3, model, optimizer, scheduler, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003"]


# -- --out, --resume and --overwrite at the command line ------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("job")
    return tiny_model(tmp / "bert"), write_jsonl(tmp / "train.jsonl", sentiment_records(24))


def _finetune(capsys, job: tuple[Path, Path], out: Path, *extra: str) -> tuple[int, str]:
    model, data = job
    code = main(["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "8", "--eval-every", "0", "--threads", "1",
                 "--progress", "none", *extra])  # fmt: skip
    return code, capsys.readouterr().err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_planted_state_pt_is_refused_by_resume_and_never_run(tmp_path: Path, job, capsys) -> None:
    folder, marker = _checkpoint_with_pickle(tmp_path, "state.pt")
    before = _files(tmp_path / "out")
    code, err = _finetune(capsys, job, tmp_path / "out", "--resume")
    assert code == 2 and not marker.exists()
    assert f"lorakit finetune: error: {folder / 'state.pt'} is a pickle" in err
    assert _files(tmp_path / "out") == before  # no restart from scratch, nothing rewritten


@pytest.mark.parametrize("what", ["adapter", "checkpoint"])
def test_a_fresh_run_refuses_an_out_holding_a_run(tmp_path: Path, job, capsys, what) -> None:
    out = tmp_path / "out"
    if what == "adapter":
        _fake_adapter(out / "adapter")
        found = f"({out / 'adapter'})"
    else:
        complete_checkpoint(out / "checkpoints" / "step-00000002")
        found = f"(1 checkpoint(s) in {out / 'checkpoints'})"
    before = _files(out)
    code, err = _finetune(capsys, job, out)
    assert code == 2
    assert err.count("\n") == 1  # one line, no traceback
    assert f"--out {out} already holds a run {found}; pass --resume to continue it, " in err
    assert "--overwrite to replace it" in err
    assert _files(out) == before


def test_overwrite_replaces_the_earlier_run(tmp_path: Path, job, capsys) -> None:
    out = tmp_path / "out"
    stale = complete_checkpoint(out / "checkpoints" / "step-00000009")
    code, err = _finetune(capsys, job, out, "--overwrite")
    assert code == 0, err
    assert not stale.exists() and latest_checkpoint(out) == out / "checkpoints" / "step-00000002"
    assert read_checkpoint(latest_checkpoint(out))["position"]["step"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_and_overwrite_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        TrainOptions(resume=True, overwrite=True)


@pytest.mark.parametrize("torn", [False, True])
def test_resume_with_no_complete_checkpoint_names_out(tmp_path: Path, job, capsys, torn) -> None:
    out = tmp_path / "out"
    if torn:  # only debris: a step folder without its adapter
        (out / "checkpoints" / "step-00000004").mkdir(parents=True)
        (out / "checkpoints" / "step-00000004" / "state.json").write_text("{}")
    code, err = _finetune(capsys, job, out, "--resume")
    assert code == 2
    assert f"--resume: --out {out} holds no complete checkpoint to resume from" in err
    assert not (out / "adapter").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("inside", [False, True])
def test_out_that_is_a_file_is_a_one_line_error(tmp_path: Path, job, capsys, inside) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    out = file / "run" if inside else file
    code, err = _finetune(capsys, job, out)
    assert code == 2 and err.count("\n") == 1
    where = f" ({file} is a file)" if inside else ""
    assert f"lorakit finetune: error: --out {out} is not a folder{where}" in err
    assert file.read_text() == "keep me"


def _read_only_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    complete_checkpoint(folder / "checkpoints" / "step-00000002")
    folder.chmod(0o555)
    return folder


def test_read_only_out_is_a_one_line_error(tmp_path: Path, job, capsys) -> None:
    folder = _read_only_dir(tmp_path)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root) can write a 0o555 folder; see the monkeypatched test")
        before = _files(folder)
        code, err = _finetune(capsys, job, folder, "--resume")
        assert code == 2 and err.count("\n") == 1
        assert f"lorakit finetune: error: --out {folder} is not writable: " in err
        assert _files(folder) == before
    finally:
        folder.chmod(0o755)


def test_unwritable_out_is_refused_before_anything_is_written(
    tmp_path: Path, job, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the tests run as root, permission bits do not stop writes: fail the probe instead.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("lorakit.train.out_folder.tempfile.TemporaryFile", refuse)
    out = tmp_path / "new" / "run"
    code, err = _finetune(capsys, job, out)
    assert code == 2 and err.count("\n") == 1
    assert f"--out {out} (to be created in {tmp_path}) is not writable: Permission denied" in err
    assert not (tmp_path / "new").exists()
