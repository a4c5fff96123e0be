"""File-system primitives every part of kvfast shares: durable and atomic writes, directory fsync, file locks,
exact positional reads, and opening a file that must be a regular file (never a FIFO or a device).

A crash (or ``kill -9``) at any point must leave either the old file or the complete new one, never a half-written
one: new files are written beside their destination, fsynced, renamed over it, and the folder fsynced so the
rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from kvfast.errors import FileAccessError, file_access_error

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
    """An exclusive ``fcntl.flock`` on ``path`` (created if absent), shared by every process on the machine.

    A symbolic link planted at ``path`` is refused (:class:`FileAccessError`), never followed to create or
    lock a file elsewhere.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise file_access_error(exc, path, "locking") from None
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


# -- files that must be regular files --------------------------------------------------------------------------
def open_regular(path: str | os.PathLike, *, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and return its descriptor and ``fstat``, refusing anything but a regular file.

    ``O_NONBLOCK`` makes the open itself return at once on a FIFO (a plain open waits for a writer forever);
    the type is then checked on the descriptor, so a file swapped in after a ``stat`` cannot slip through.
    With ``follow_symlinks=False`` a symbolic link is refused too (``O_NOFOLLOW``).

    Raises:
        FileAccessError: the path is missing, not permitted, a symbolic link (when not followed), or not a
            regular file (a folder, FIFO, socket or device); ``errno`` says which.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise file_access_error(exc, path, "opening") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise FileAccessError(f"is {kind}, expected a regular file", path=path,
                                  errno=errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_small_file(path: str | os.PathLike, max_bytes: int, *,
                    follow_symlinks: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of a regular file of at most ``max_bytes`` (a key, a signature sidecar) and its ``fstat``.

    The cap holds even if the file grows after the ``fstat``: at most ``max_bytes + 1`` bytes are ever read.

    Raises:
        FileAccessError: as :func:`open_regular`, or the file is larger than ``max_bytes`` (``errno`` EFBIG).
    """
    fd, st = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        data = os.pread(fd, max_bytes + 1, 0) if st.st_size <= max_bytes else b""
        if st.st_size > max_bytes or len(data) > max_bytes:
            raise FileAccessError(f"has {max(st.st_size, len(data))} bytes or more, over the {max_bytes} such a "
                                  "file may have", path=path, errno=errno.EFBIG)
    finally:
        os.close(fd)
    return data, st


def is_real_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder itself, not a symbolic link to one (``lstat``)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def require_real_dir(path: str | os.PathLike) -> None:
    """Create the folder ``path`` if absent; refuse a symbolic link or a file there (:class:`FileAccessError`).

    The store's own folders must be inside its root: a link planted there would make it write, lock and
    delete files wherever the link points.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    if not is_real_dir(path):
        raise FileAccessError("is a symbolic link or a file where the store keeps a folder of its own; remove it",
                              path=path, errno=errno.ENOTDIR)
