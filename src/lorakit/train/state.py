"""Crash-safe checkpoints: trainable tensors, optimizer, scheduler, RNG and data position.

A checkpoint is a folder `out/checkpoints/step-00000120/` holding

    state.safetensors  every tensor `--resume` needs: trainable parameters, optimizer
                       moments and steps, each rank's torch (and CUDA) RNG state as uint8
    state.json         the rest: data position, optimizer hyper-parameters, scheduler,
                       each rank's Python `random` state, world size, run totals and metrics
    adapter/           the adapter at that step, PEFT format

No pickle anywhere, so reading a checkpoint cannot run code (`train.state_format` has the
encoding). A checkpoint is written into a temporary sibling folder and renamed into place,
and a rename is atomic: a crash leaves either the whole checkpoint or none of it. Old ones
are pruned by renaming them to a hidden `.trash-` name before deleting, and a `step-` folder
that lacks a state file or the adapter (debris of older versions) is never counted.

A `state.pt` (the pickle format of earlier versions) is refused by name, never loaded.

Only rank 0 writes; every rank's RNG state is gathered into the files first, so a resumed
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

from ..checkpoint.atomic import TRASH_PREFIX, atomic_folder
from ..errors import CheckpointError
from .distributed import DistEnv, broadcast_object, full_params, gather_objects
from .state_format import JSON_FILE, TENSOR_FILE, read_state, write_state

LEGACY_FILE = "state.pt"  # the pickle of earlier versions: refused by name, never read
ADAPTER_DIR = "adapter"
_NAME = re.compile(r"step-(\d{8})")
_REQUIRED = ("position", "rng", "model", "optimizer", "scheduler", "world_size")


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, the epoch, micro-batches done in it."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def checkpoint_dir(out: str | Path) -> Path:
    """The folder under `out` that holds the `step-*` checkpoints."""
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint folder in `out`, or None."""
    found = _checkpoints(checkpoint_dir(out))
    return found[-1] if found else None


def is_complete(folder: Path) -> bool:
    """True if `folder` holds both state files (or a legacy state.pt) and an adapter."""
    adapter = folder / ADAPTER_DIR
    has_adapter = (adapter / "adapter_config.json").is_file() and any(
        adapter.glob("adapter_model.*")
    )
    new = (folder / JSON_FILE).is_file() and (folder / TENSOR_FILE).is_file()
    # A legacy checkpoint still counts, so that --resume names its state.pt and refuses it
    # rather than passing over it to an older one or starting afresh.
    return has_adapter and (new or (folder / LEGACY_FILE).is_file())


def _checkpoints(root: Path) -> list[Path]:
    """Complete `step-*` folders under `root`, oldest first (temporary, trashed and
    incomplete ones excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if _NAME.fullmatch(p.name) and is_complete(p))


def rng_state() -> dict[str, Any]:
    """Every random stream training touches: Python, torch CPU and (if present) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (CUDA only where CUDA is present)."""
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
    with FSDP parameters all-gathered). `extra` holds JSON-able run data (totals, metrics),
    returned by `load_checkpoint`. Collective: every rank must call it.
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
            _prune(final.parent, keep)
    return final


def _write_atomically(final: Path, state: dict[str, Any], write_adapter: Callable) -> None:
    """Fill a temporary sibling folder, then rename it to `final` (atomic on POSIX); the
    same step written again sets the old one aside first, so a crash never loses both."""
    with atomic_folder(final) as tmp:
        write_state(tmp, state)
        write_adapter(tmp / ADAPTER_DIR)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, incomplete `step-*` folders and
    leftover trash. Each is first renamed to a hidden `.trash-` name: a kill during the
    deletion leaves a folder no listing counts, never a `step-` folder with files missing."""
    kept = set(_checkpoints(root)[-keep:])
    for path in sorted(root.iterdir()):
        if _NAME.fullmatch(path.name) and path not in kept:
            trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{os.getpid()}")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif path.name.startswith(TRASH_PREFIX):  # a previous run was killed while deleting it
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The training state in checkpoint `folder`, checked for the keys training needs.

    Raises:
        CheckpointError: the folder holds a legacy pickle `state.pt` (never read), or a state
            file is missing, damaged or foreign; the message names the file.
    """
    if not (folder / JSON_FILE).exists() and (folder / LEGACY_FILE).exists():
        raise CheckpointError(
            f"{folder / LEGACY_FILE} is a pickle (the checkpoint format of earlier lorakit "
            "versions), and reading a pickle can run code: lorakit does not load it. Start "
            f"the run again (--overwrite), or resume from checkpoints with {JSON_FILE} and "
            f"{TENSOR_FILE}"
        )
    state = read_state(folder)
    path = folder / JSON_FILE
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it is not a training checkpoint")
    pos = state["position"]
    if (
        not isinstance(pos, dict)
        or sorted(pos) != ["batch", "epoch", "step"]
        or not all(type(v) is int and v >= 0 for v in pos.values())
    ):
        raise CheckpointError(f"{path}: position must be {{step, epoch, batch}} >= 0, got {pos}")
    rngs, model = state["rng"], state["model"]
    if not isinstance(rngs, list) or not rngs or not all(isinstance(r, dict) for r in rngs):
        raise CheckpointError(f"{path}: rng must be a non-empty list of per-rank states")
    if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
        raise CheckpointError(f"{path}: model must map parameter names to tensors")
    return state


def load_checkpoint(
    folder: Path,
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fsdp: bool = False,
) -> tuple[Position, dict[str, Any]]:
    """Restore model, optimizer, scheduler and this rank's RNG from `folder`.

    Rank 0 reads the files and broadcasts their content (or its error, so every rank
    raises), so other nodes need not see rank 0's disk. Returns the data position and the
    whole state (for extra keys such as metrics).

    Raises:
        CheckpointError: a state file is unreadable, foreign or a legacy pickle, or its
            content does not fit the model, optimizer or scheduler; the message names it.
    """
    payload: dict[str, Any] | str | None = None
    if env.is_main:
        try:
            payload = read_checkpoint(folder)
        except CheckpointError as err:
            payload = str(err)
    payload = broadcast_object(env, payload)
    if isinstance(payload, str):
        raise CheckpointError(payload)
    state = payload
    try:
        _restore(folder, state, env, model, optimizer, scheduler, fsdp)
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {folder} does not fit this run ({type(err).__name__}: {err}); "
            "resume with the same model and options"
        ) from None
    return Position(**state["position"]), state


def _restore(
    folder: Path,
    state: dict[str, Any],
    env: DistEnv,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fsdp: bool,
) -> None:
    expected = set(scheduler.state_dict())
    if set(state["scheduler"]) != expected:  # LambdaLR copies these keys into its __dict__
        raise CheckpointError(
            f"{folder / JSON_FILE}: scheduler keys {sorted(state['scheduler'])} are not "
            f"{sorted(expected)}"
        )
    if fsdp:
        _restore_fsdp(model, optimizer, state)
    else:
        _restore_params(model, state["model"], folder)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    # Same world size: each rank continues its own random stream; otherwise rank 0's.
    set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else rngs[0])


def _restore_params(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors))[:3]
        unexpected = sorted(set(tensors) - set(params))[:3]
        raise CheckpointError(
            f"checkpoint {folder} does not fit the model's trainable parameters "
            f"(missing {missing}, unexpected {unexpected}); resume with the same options"
        )
    for name, p in params.items():  # every shape checked before any parameter changes
        if p.shape != tensors[name].shape:
            raise CheckpointError(
                f"checkpoint {folder}: {name} has shape {tuple(tensors[name].shape)}, "
                f"the model has {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def _optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> Any:
    """The optimizer's state dict: keyed by parameter index, or under FSDP (a full state
    dict, on rank 0) by parameter name; `state_format` keeps either key kind."""
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
