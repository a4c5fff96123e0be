"""File-system primitives every part of kvfast shares: durable and atomic writes, directory fsync, file locks,
exact positional reads.

A crash (or ``kill -9``) at any point must leave either the old file or the complete new one, never a half-written
one: new files are written beside their destination, fsynced, renamed over it, and the folder fsynced so the
rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

# Copies and hashes are memory-bound: a few threads saturate memory bandwidth, more only contend.
DEFAULT_THREADS = min(4, os.cpu_count() or 1)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where the platform cannot fsync a folder)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def write_durable(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (the caller renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """fsync a file written by someone else (e.g. ``shutil.copyfile``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, mode: int = 0o666) -> Path:
    """Create or replace ``path`` atomically: ``write(f)`` fills a temp file in the same folder, which is fsynced
    and renamed over ``path``; the folder is fsynced. On any failure the temp file is removed and ``path`` is
    untouched.

    ``mode`` is the new file's permission bits before the umask (not ``mkstemp``'s 0600, which would survive
    the rename).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def flock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (created if absent), shared by every process on the machine."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_exact(fd: int, out: memoryview, offset: int) -> bool:
    """Fill ``out`` from ``fd`` at ``offset`` (``preadv`` until done); False when the file ends first."""
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
