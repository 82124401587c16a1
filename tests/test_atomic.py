"""checkpoint/atomic.py: a file or folder is the old one or the new one, never a mix."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lorakit.checkpoint import atomic
from lorakit.checkpoint.atomic import atomic_folder, atomic_write


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class Crash(Exception):
    pass


# -- files ------------------------------------------------------------------------------------
def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.json"  # the folder is made
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert _names(path.parent) == ["f.json"]


def test_a_crash_mid_write_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"old contents")

    def half_then_crash(f, data: bytes) -> None:
        f.write(data[: len(data) // 2])
        raise Crash

    monkeypatch.setattr(atomic, "write_bytes", half_then_crash)
    with pytest.raises(Crash):
        atomic_write(path, b"new contents, longer than the old")
    assert path.read_bytes() == b"old contents"
    assert _names(tmp_path) == ["f.bin"]  # the half-written temporary is gone


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_written_file_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == mode


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_the_file_and_its_folder_are_fsynced(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write(tmp_path / "f", b"x")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)


# -- folders ----------------------------------------------------------------------------------
def _folder(path: Path, *files: str) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(name)
    return path


def test_a_folder_replaces_the_old_one_whole(tmp_path: Path) -> None:
    final = _folder(tmp_path / "step", "old-a", "old-b")
    with atomic_folder(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-") and not any(tmp.iterdir())
        (tmp / "new").write_text("new")
        assert _names(final) == ["old-a", "old-b"]  # untouched until the block ends
    assert _names(final) == ["new"]
    assert _names(tmp_path) == ["step"]  # neither the temporary nor the trash is left


def test_a_crash_while_filling_leaves_the_old_folder(tmp_path: Path) -> None:
    final = _folder(tmp_path / "step", "old")
    with pytest.raises(Crash), atomic_folder(final) as tmp:
        (tmp / "half").write_text("half")
        raise Crash
    assert _names(final) == ["old"]
    assert _names(tmp_path) == ["step"]


def test_a_stale_temporary_of_this_pid_is_cleared_first(tmp_path: Path) -> None:
    _folder(tmp_path / f".tmp-step-{os.getpid()}", "stale")
    with atomic_folder(tmp_path / "step") as tmp:
        assert not any(tmp.iterdir())
    assert _names(tmp_path) == ["step"]


def test_without_replace_an_empty_folder_is_taken_and_a_full_one_refused(tmp_path: Path) -> None:
    empty = _folder(tmp_path / "empty")
    with atomic_folder(empty, replace=False) as tmp:
        (tmp / "new").write_text("new")
    assert _names(empty) == ["new"]

    full = _folder(tmp_path / "full", "users-file")
    with pytest.raises(OSError), atomic_folder(full, replace=False) as tmp:
        (tmp / "new").write_text("new")
    assert _names(full) == ["users-file"]
    assert _names(tmp_path) == ["empty", "full"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize(
    ("mode", "umask", "expected"), [(0o777, 0o022, 0o755), (0o777, 0o077, 0o700), (0o700, 0, 0o700)]
)
def test_a_folder_gets_its_mode_under_the_umask(
    tmp_path: Path, mode: int, umask: int, expected: int
) -> None:
    old = os.umask(umask)
    try:
        with atomic_folder(tmp_path / "out", mode=mode):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == expected
