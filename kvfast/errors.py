"""The exceptions kvfast raises: one base class, one class per failure a caller handles differently.

Every message names the file (when there is one) and the field or chunk at fault, and says what to do.
"""
from __future__ import annotations

import os


class KvfastError(Exception):
    """Base class of every error kvfast raises on purpose."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


# -- the file itself (docs/FORMAT.md) ------------------------------------------------------------------
class FormatError(KvfastError, ValueError):
    """The file is not a valid .kvf file. Re-publish it or fetch it again."""


class NotKvfError(FormatError):
    """The file does not start with the .kvf magic bytes (section 1 of docs/FORMAT.md)."""


class UnsupportedVersionError(FormatError):
    """The file's format version is not one this kvfast reads; upgrade kvfast or re-publish."""


class TruncatedFileError(FormatError):
    """The file ends before a region its header or manifest points at."""


class ManifestError(FormatError):
    """The JSON manifest is oversized, not JSON, or has a missing, mistyped or out-of-range field."""


class LayoutError(FormatError):
    """A region's offset or length disagrees with the file's size or with the layout the spec requires."""


class UnsupportedCodecError(FormatError):
    """The file's chunks use a codec this kvfast does not know."""


class ChecksumError(FormatError):
    """Stored bytes do not match their checksum: the file is corrupted."""


# -- the file against the consumer --------------------------------------------------------------------
class ModelMismatchError(KvfastError):
    """The KV was made by another model (other weights, config or dtype) than the one it is attached to."""


class DtypeMismatchError(ModelMismatchError):
    """The KV's dtype differs from the paged cache's or the model's."""


class ShapeMismatchError(ModelMismatchError):
    """The KV's layers, KV heads or head_dim differ from the paged cache's."""


class TokenMismatchError(KvfastError):
    """The file's token ids are not the ones the caller expects."""


# -- the paged cache ----------------------------------------------------------------------------------
class CacheFullError(KvfastError, MemoryError):
    """The paged cache has no free blocks left; free sequences or allocate more blocks."""


# -- the caller's input ---------------------------------------------------------------------------------
class InvalidArgumentError(KvfastError, ValueError, TypeError):
    """An argument is missing or outside what is allowed (token ids the model has no embedding for, a
    document longer than its position limit, a prefix longer than the file); the message names both."""


class FileAccessError(KvfastError, OSError):
    """A path cannot be used as asked: missing, a folder where a file is expected, not permitted, or the disk
    is full. ``errno`` is the operating system's code."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, errno: int | None = None):
        super().__init__(message, path=path)
        self.errno = errno


def file_access_error(exc: OSError, path: str | os.PathLike, doing: str) -> FileAccessError:
    """``exc`` (from ``doing`` to ``path``) as a one-line :class:`FileAccessError` naming ``path``."""
    import errno as errnos

    what = {errnos.ENOENT: "no such file or folder", errnos.EISDIR: "is a folder, expected a file",
            errnos.ENOTDIR: "a parent of this path is a file, not a folder",
            errnos.EACCES: "permission denied", errnos.EPERM: "permission denied",
            errnos.ENOSPC: "no space left on the device"}.get(exc.errno, exc.strerror or str(exc))
    return FileAccessError(f"{doing}: {what}", path=path, errno=exc.errno)
