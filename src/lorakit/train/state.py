"""Crash-safe checkpoints: trainable tensors, optimizer, scheduler, RNG and data position.

A checkpoint is a folder `out/checkpoints/step-00000120/` holding `state.pt` (everything
`--resume` needs) and `adapter/` (the adapter at that step, PEFT format). It is written into
a temporary sibling folder and renamed into place, and a rename is atomic: a crash at any
moment leaves either the whole checkpoint or none of it, never half of one.

Only rank 0 writes; every rank's RNG state is gathered into the file first, so a resumed
distributed run draws the same dropout masks it would have drawn.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .distributed import DistEnv, broadcast_object, full_params, gather_objects

STATE_FILE = "state.pt"
_NAME = re.compile(r"step-(\d{8})")


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, the epoch, micro-batches done in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `out`, or None."""
    found = _checkpoints(checkpoint_dir(out))
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (temporary ones excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name))


def rng_state() -> dict[str, Any]:
    """Every random stream training touches: Python, torch CPU and (if present) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module, fsdp: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name: CPU copy} of the parameters that train (collective under FSDP)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        return get_model_state_dict(model, options=options)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out: str | Path,
    env: DistEnv,
    position: Position,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    write_adapter: Callable[[Path], Any],
    keep: int = 2,
    fsdp: bool = False,
) -> Path:
    """Write checkpoint `step-<position.step>` atomically (rank 0) and prune old ones.

    `model` is the unwrapped model; `write_adapter(folder)` saves the PEFT adapter (rank 0,
    with FSDP parameters all-gathered). Collective: every rank must call it.
    """
    state = {
        "position": position.__dict__,
        "rng": gather_objects(env, rng_state()),
        "model": trainable_state(model, fsdp),
        "optimizer": _optimizer_state(model, optimizer, fsdp),
        "scheduler": scheduler.state_dict(),
        "world_size": env.world_size,
        **extra,
    }
    final = checkpoint_dir(out) / f"step-{position.step:08d}"
    with full_params(model, fsdp):
        if env.is_main:
            _write_atomically(final, state, write_adapter)
            for old in _checkpoints(final.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomically(final: Path, state: dict[str, Any], write_adapter: Callable) -> None:
    """Fill a temporary sibling folder, then rename it to `final` (atomic on POSIX)."""
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_synced(state, tmp / STATE_FILE)
    write_adapter(tmp / "adapter")
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():  # the same step written again: set the old one aside, never lose both
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fsdp: bool = False,
) -> tuple[Position, dict[str, Any]]:
    """Restore model, optimizer, scheduler and this rank's RNG from `folder`.

    Rank 0 reads the file and broadcasts it, so other nodes need not see rank 0's disk.
    Returns the data position and the whole state (for extra keys such as metrics).

    Raises:
        CheckpointError: the file is unreadable or its tensors do not fit the model.
    """
    state = None
    if env.is_main:
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError) as err:
            raise CheckpointError(f"cannot read checkpoint {folder / STATE_FILE}: {err}") from None
    state = broadcast_object(env, state)
    if fsdp:
        _restore_fsdp(model, optimizer, state)
    else:
        _restore_params(model, state["model"], folder)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    # Same world size: each rank continues its own random stream; otherwise rank 0's.
    set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])
    return Position(**state["position"]), state


def _restore_params(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - set(params))[:3]
        raise CheckpointError(
            f"checkpoint {folder} does not fit the model's trainable parameters "
            f"(missing {missing}, unexpected {unexpected}); resume with the same options"
        )
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != tensors[name].shape:
                raise CheckpointError(
                    f"checkpoint {folder}: {name} has shape {tuple(tensors[name].shape)}, "
                    f"the model has {tuple(p.shape)}"
                )
            p.copy_(tensors[name])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Any:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def _restore_fsdp(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=options,
    )


def _save_synced(obj: Any, path: Path) -> None:
    """torch.save, then fsync, so the rename that follows publishes a file on disk."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
