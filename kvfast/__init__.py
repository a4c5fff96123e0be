"""kvfast: compute a document's prefill once; load its KV cache, bit-exactly, everywhere else.

The public API (see README.md). Everything here is re-exported from the module that implements it, imported
on first use (PEP 562): ``import kvfast`` costs nothing until a name is touched, so ``kvfast --help`` and
``kvfast --version`` answer without importing torch or transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "backend": ("kvfast._backend", "backend"),
    **{name: ("kvfast.errors", name) for name in (
        "CacheFullError", "ChecksumError", "CodecError", "DtypeMismatchError", "FileAccessError", "FileMissingError",
        "FormatError", "InvalidArgumentError", "KvfastError", "LayoutError", "LedgerError", "ManifestError",
        "ModelMismatchError", "NotKvfError", "OriginError", "PagesError", "ShapeMismatchError", "SignatureError",
        "TokenMismatchError", "TruncatedFileError", "UnsupportedCodecError", "UnsupportedVersionError")},
    **{name: ("kvfast.identity", name) for name in (
        "block_hashes", "checkpoint_fingerprint", "document_key", "fingerprint")},
    "KvfReader": ("kvfast.format", "KvfReader"),
    "Manifest": ("kvfast.format", "Manifest"),
    "save_kv": ("kvfast.format", "save_kv"),
    "open": ("kvfast.format", "open_kvf"),  # kvfast.open mirrors safetensors.safe_open
    **{name: ("kvfast.cache", name) for name in ("KVPages", "KVSequence", "PagedKVCache")},
    **{name: ("kvfast.loader", name) for name in ("LoadHandle", "load", "load_async", "load_into")},
    **{name: ("kvfast.hf", name) for name in (
        "GenerationOutput", "PagedCache", "VerifyReport", "capture_kv", "extend", "generate", "publish", "verify")},
    **{name: ("kvfast.origin", name) for name in ("Origin", "OriginConfig")},
    **{name: ("kvfast.store", name) for name in ("Store", "StoreEntry", "StoreKey", "StoreMatch", "StoreStats")},
    "AuditReport": ("kvfast.trust.audit", "AuditReport"),
    "audit": ("kvfast.trust.audit", "audit"),
    "Ledger": ("kvfast.trust.ledger", "Ledger"),
    **{name: ("kvfast.trust.signing", name) for name in ("keygen", "sign", "verify_signature")},
}

__all__ = [  # every public name (a literal, for type checkers and IDEs)
    "AuditReport", "CacheFullError", "ChecksumError", "CodecError", "DtypeMismatchError", "FileAccessError",
    "FileMissingError", "FormatError", "GenerationOutput", "InvalidArgumentError", "KVPages", "KVSequence",
    "KvfReader", "KvfastError", "LayoutError", "Ledger", "LedgerError", "LoadHandle", "Manifest", "ManifestError",
    "ModelMismatchError", "NotKvfError", "Origin", "OriginConfig", "OriginError", "PagedCache", "PagedKVCache",
    "PagesError", "ShapeMismatchError", "SignatureError", "Store", "StoreEntry", "StoreKey", "StoreMatch",
    "StoreStats", "TokenMismatchError", "TruncatedFileError", "UnsupportedCodecError", "UnsupportedVersionError",
    "VerifyReport", "audit", "backend", "block_hashes", "capture_kv", "checkpoint_fingerprint", "document_key",
    "extend", "fingerprint", "generate", "keygen", "load", "load_async", "load_into", "open", "publish", "save_kv",
    "sign", "verify", "verify_signature",
]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first use and cache the name here."""
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'kvfast' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from kvfast._backend import backend
    from kvfast.cache import KVPages, KVSequence, PagedKVCache
    from kvfast.errors import (CacheFullError, ChecksumError, CodecError, DtypeMismatchError, FileAccessError,
                               FileMissingError, FormatError, InvalidArgumentError, KvfastError, LayoutError,
                               LedgerError, ManifestError, ModelMismatchError, NotKvfError, OriginError, PagesError,
                               ShapeMismatchError, SignatureError, TokenMismatchError, TruncatedFileError,
                               UnsupportedCodecError, UnsupportedVersionError)
    from kvfast.format import KvfReader, Manifest, save_kv
    from kvfast.format import open_kvf as open  # noqa: A001
    from kvfast.hf import (GenerationOutput, PagedCache, VerifyReport, capture_kv, extend, generate, publish,
                           verify)
    from kvfast.identity import block_hashes, checkpoint_fingerprint, document_key, fingerprint
    from kvfast.loader import LoadHandle, load, load_async, load_into
    from kvfast.origin import Origin, OriginConfig
    from kvfast.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats
    from kvfast.trust.audit import AuditReport, audit
    from kvfast.trust.ledger import Ledger
    from kvfast.trust.signing import keygen, sign, verify_signature
