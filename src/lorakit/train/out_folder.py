"""Checks of the output folder (`--out`) before a run writes anything into it.

A run refuses, with a one-line error, an `out` that is a file or not writable, `--resume`
with no checkpoint to resume from, and a fresh run into an `out` that already holds an
adapter or checkpoints (unless `--overwrite`): it never replaces a finished run silently.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .state import ADAPTER_DIR, checkpoint_dir, latest_checkpoint


def check_out(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Raise if a run with these options must not start in `out`; changes nothing.

    Raises:
        ConfigError: `out` (or a folder above it) is a file, `out` is not writable, or a
            fresh run would replace an existing adapter or checkpoints without `overwrite`.
        CheckpointError: `resume` and `out` holds no complete checkpoint.
    """
    out = Path(out)
    _check_writable(out)
    if resume:
        if latest_checkpoint(out) is None:
            raise CheckpointError(
                f"--resume: --out {out} holds no complete checkpoint to resume from (looked "
                f"in {checkpoint_dir(out)}); run without --resume to start a new run"
            )
        return
    if overwrite:
        return
    found = _previous_run(out)
    if found:
        raise ConfigError(
            f"--out {out} already holds a run ({found}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )


def _check_writable(out: Path) -> None:
    """`out`, or the nearest folder above it that exists, is a folder this process can write.

    Probed by creating (and at once deleting) a temporary file, which also holds for root,
    read-only mounts and ACLs, where permission bits alone would mislead.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out else f" ({existing} is a file)"
        raise ConfigError(f"--out {out} is not a folder{where}; pass a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        what = out if existing == out else f"{out} (to be created in {existing})"
        raise ConfigError(f"--out {what} is not writable: {err.strerror}") from None


def _previous_run(out: Path) -> str:
    """What of an earlier run `out` holds ('' if nothing): its adapter and checkpoints."""
    found = []
    if (out / ADAPTER_DIR).exists():
        found.append(str(out / ADAPTER_DIR))
    steps = sorted(checkpoint_dir(out).glob("step-*")) if checkpoint_dir(out).is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s) in {checkpoint_dir(out)}")
    return ", ".join(found)
