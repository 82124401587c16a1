"""Atomic writes: a file or a folder is filled under a temporary name beside its final one,
then renamed into place (rename is atomic within one file system), so a reader or a crash
sees the old version or the new one, never a mix.

    atomic_write(path, data)                 a file: the old one or the new one
    with atomic_folder(final) as tmp: ...    a folder: filled in `tmp`, swapped in at the end
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # a folder being filled: no listing of finished work counts it
TRASH_PREFIX = ".trash-"  # an old folder set aside to be deleted; safe to delete any time


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries (a rename in it) to disk; a no-op without directory fds."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_file(path: Path) -> tuple[int, Path]:
    """A new file beside `path`, created with mode 0666 so the umask applies to it as to any
    other file (mkstemp would make it owner-only)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over `path`;
    the folder is fsynced so the rename survives a crash. An interrupted write leaves at most
    a stray `.tmp` file (removed unless the process was killed), never a damaged `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write_bytes(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(f, data: bytes) -> None:  # noqa: ANN001 - a binary file object
    """The one place bytes hit a file (a seam the interrupted-save tests slow down)."""
    f.write(data)


@contextmanager
def atomic_folder(final: Path, *, replace: bool = True, mode: int = 0o777) -> Iterator[Path]:
    """Yield an empty folder `.tmp-<name>-<pid>` beside `final`; when the block ends without
    an exception it becomes `final`, else it is removed. The folder is made with `mode` (the
    umask applies). An existing `final` is set aside as `.trash-<name>-<pid>` and deleted
    once the new one is in place, so a crash never loses both; with `replace=False` it must
    be an empty folder (OSError otherwise), so a user's files are never deleted.
    """
    tmp = final.with_name(f"{TEMP_PREFIX}{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier process with our pid
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(mode=mode)
    try:
        yield tmp
        _swap_in(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path, replace: bool) -> None:
    trash = None
    if final.exists() and not replace:
        final.rmdir()  # empty, or OSError: nothing of the user's is deleted
    elif final.exists():
        trash = final.with_name(f"{TRASH_PREFIX}{final.name}-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
