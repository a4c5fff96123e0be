"""Every exception kvfast raises on purpose: one base class, one class per failure a caller handles differently.

Every message names the file (when there is one) and the field or chunk at fault, and says what to do. The same
facts ride along as attributes (``path``, ``chunk``, and ``errno`` on OS errors) for code that reacts to them.
Failures inside the native extension come back as these classes too: :mod:`kvfast.loader.native` maps them at the
binding boundary, so callers never match strings or catch ``RuntimeError``.
"""
from __future__ import annotations

import errno as errnos
import os


class KvfastError(Exception):
    """Base class of every error kvfast raises on purpose.

    Attributes:
        path: the file at fault, or None.
        chunk: the index of the chunk at fault (docs/FORMAT.md §5), or None.
        detail: the message without the path (for an error that wraps this one and names the path itself).
    """

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, chunk: int | None = None):
        self.path = os.fspath(path) if path is not None else None
        self.chunk = chunk
        self.detail = message
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


class CodecError(FormatError):
    """A chunk's encoded bytes are inconsistent (a size, a code table or a bit stream): the file is damaged or
    was not written by kvfast. Re-publish it or fetch it again."""


# -- the file against the consumer --------------------------------------------------------------------
class ModelMismatchError(KvfastError):
    """The KV was made by another model (other weights, config or dtype) than the one it is attached to."""


class DtypeMismatchError(ModelMismatchError):
    """The KV's dtype differs from the paged cache's or the model's."""


class ShapeMismatchError(ModelMismatchError):
    """The KV's layers, KV heads or head_dim differ from the paged cache's."""


class TokenMismatchError(KvfastError):
    """The file's token ids are not the ones the caller expects."""


# -- destination pages ----------------------------------------------------------------------------------
class CacheFullError(KvfastError, MemoryError):
    """The paged cache has no free blocks left; free sequences or allocate more blocks."""


class PagesError(KvfastError, ValueError):
    """Destination pages or block ids that a load cannot fill: out of range, repeated, or too few."""


class KVLayoutError(KvfastError, ValueError):
    """vLLM's KV cache has a layout kvfast does not know (backend, shape, dtype or strides); nothing is loaded."""


# -- the copy -------------------------------------------------------------------------------------------
class LoadCancelledError(KvfastError):
    """The load was cancelled before it finished; the destination pages hold partial data."""


class DeviceError(KvfastError, RuntimeError):
    """A CUDA call failed while loading (the message carries the runtime's words)."""


# -- trust ------------------------------------------------------------------------------------------------
class SignatureError(KvfastError):
    """An artifact is unsigned, signed by a key not trusted, or its bytes differ from what was signed."""


class LedgerError(KvfastError):
    """The ledger is unreadable or its hash chain is broken (a record edited, deleted or reordered)."""


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


class FileMissingError(FileAccessError, FileNotFoundError):
    """The path does not exist (``errno`` ENOENT). Also a :class:`FileNotFoundError`, so code that treats a file
    removed under it (by another process, or the store's eviction) as a normal event keeps catching it."""


def file_access_error(exc: OSError, path: str | os.PathLike, doing: str) -> FileAccessError:
    """``exc`` (from ``doing`` to ``path``) as a one-line :class:`FileAccessError` naming ``path``."""
    what = {errnos.ENOENT: "no such file or folder", errnos.EISDIR: "is a folder, expected a file",
            errnos.ENOTDIR: "a parent of this path is a file, not a folder",
            errnos.EACCES: "permission denied", errnos.EPERM: "permission denied",
            errnos.ENOSPC: "no space left on the device",
            errnos.ELOOP: "is a symbolic link, which kvfast does not follow here"}.get(exc.errno, exc.strerror or str(exc))
    cls = FileMissingError if exc.errno == errnos.ENOENT else FileAccessError
    return cls(f"{doing}: {what}", path=path, errno=exc.errno)


# -- the origin (an S3-compatible object store) ------------------------------------------------------------
class OriginError(KvfastError, OSError):
    """The origin (an S3-compatible object store, or a presigned URL) could not serve a request: unreachable,
    timed out, refused (credentials, permissions, an expired or altered presigned URL), or it holds an object that
    disagrees with its index entry. The message names the URL; nothing was written to a local tier."""
