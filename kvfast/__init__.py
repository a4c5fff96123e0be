"""kvfast: compute a document's prefill once; load its KV cache, bit-exactly, everywhere else.

The public API (see README.md). Everything here is re-exported from the module that implements it, imported
on first use (PEP 562): ``import kvfast`` costs nothing until a name is touched, so ``kvfast --help`` and
``kvfast --version`` answer without importing torch or transformers.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "backend": ("kvfast._backend", "backend"),
    "CodecError": ("kvfast.codec", "CodecError"),
    **{name: ("kvfast.errors", name) for name in (
        "CacheFullError", "ChecksumError", "DtypeMismatchError", "FileAccessError", "FormatError",
        "InvalidArgumentError", "KvfastError", "LayoutError", "ManifestError", "ModelMismatchError", "NotKvfError",
        "ShapeMismatchError", "TokenMismatchError", "TruncatedFileError", "UnsupportedCodecError",
        "UnsupportedVersionError")},
    **{name: ("kvfast.fingerprint", name) for name in (
        "block_hashes", "checkpoint_fingerprint", "document_key", "fingerprint")},
    "KvfReader": ("kvfast.format", "KvfReader"),
    "Manifest": ("kvfast.format", "Manifest"),
    "save_kv": ("kvfast.format", "save_kv"),
    "open": ("kvfast.format", "open_kvf"),  # kvfast.open mirrors safetensors.safe_open
    "GenerationOutput": ("kvfast.generate", "GenerationOutput"),
    "generate": ("kvfast.generate", "generate"),
    **{name: ("kvfast.hf", name) for name in ("PagedCache", "capture_kv", "extend", "publish")},
    "load": ("kvfast.loader", "load"),
    "load_async": ("kvfast.loader", "load_async"),
    "KVSequence": ("kvfast.paged", "KVSequence"),
    "PagedKVCache": ("kvfast.paged", "PagedKVCache"),
    **{name: ("kvfast.store", name) for name in ("Store", "StoreEntry", "StoreKey", "StoreMatch", "StoreStats")},
    "VerifyReport": ("kvfast.verify", "VerifyReport"),
    "verify": ("kvfast.verify", "verify"),
    "AuditReport": ("kvfast.audit", "AuditReport"),
    "audit": ("kvfast.audit", "audit"),
    "Ledger": ("kvfast.ledger", "Ledger"),
    "LedgerError": ("kvfast.ledger", "LedgerError"),
    **{name: ("kvfast.sign", name) for name in ("SignatureError", "keygen", "sign", "verify_signature")},
}

__all__ = [  # every public name (a literal, for type checkers and IDEs)
    "AuditReport", "CacheFullError", "ChecksumError", "CodecError", "DtypeMismatchError", "FileAccessError",
    "FormatError", "GenerationOutput", "InvalidArgumentError", "KVSequence", "KvfReader", "KvfastError",
    "LayoutError", "Ledger", "LedgerError", "Manifest", "ManifestError", "ModelMismatchError", "NotKvfError",
    "PagedCache", "PagedKVCache", "ShapeMismatchError", "SignatureError", "Store", "StoreEntry", "StoreKey",
    "StoreMatch", "StoreStats", "TokenMismatchError", "TruncatedFileError", "UnsupportedCodecError",
    "UnsupportedVersionError", "VerifyReport", "audit", "backend", "block_hashes", "capture_kv",
    "checkpoint_fingerprint", "document_key", "extend", "fingerprint", "generate", "keygen", "load", "load_async",
    "open", "publish", "save_kv", "sign", "verify", "verify_signature"
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


class _Package(types.ModuleType):
    """kvfast itself: importing a submodule named like a public function (kvfast.verify, kvfast.sign,
    kvfast.fingerprint, ...) must not replace the function, as the import system's binding of the submodule
    onto its package would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # type checkers and IDEs see the eager imports
    from kvfast._backend import backend
    from kvfast.audit import AuditReport, audit
    from kvfast.codec import CodecError
    from kvfast.errors import (CacheFullError, ChecksumError, DtypeMismatchError, FileAccessError, FormatError,
                               InvalidArgumentError, KvfastError, LayoutError, ManifestError, ModelMismatchError,
                               NotKvfError, ShapeMismatchError, TokenMismatchError, TruncatedFileError,
                               UnsupportedCodecError, UnsupportedVersionError)
    from kvfast.fingerprint import block_hashes, checkpoint_fingerprint, document_key, fingerprint
    from kvfast.format import KvfReader, Manifest, save_kv
    from kvfast.format import open_kvf as open  # noqa: A001
    from kvfast.generate import GenerationOutput, generate
    from kvfast.hf import PagedCache, capture_kv, extend, publish
    from kvfast.ledger import Ledger, LedgerError
    from kvfast.loader import load, load_async
    from kvfast.paged import KVSequence, PagedKVCache
    from kvfast.sign import SignatureError, keygen, sign, verify_signature
    from kvfast.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats
    from kvfast.verify import VerifyReport, verify
