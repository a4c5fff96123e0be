"""kvfast: compute a document's prefill once; load its KV cache, bit-exactly, everywhere else.

The public API (see README.md). Everything here is re-exported from the module that implements it.
"""
from kvfast._backend import backend
from kvfast.cache import KVPages, KVSequence, PagedKVCache
from kvfast.errors import (
    CacheFullError,
    ChecksumError,
    CodecError,
    DtypeMismatchError,
    FormatError,
    KvfastError,
    LayoutError,
    LedgerError,
    ManifestError,
    ModelMismatchError,
    NotKvfError,
    OriginError,
    PagesError,
    ShapeMismatchError,
    SignatureError,
    TokenMismatchError,
    TruncatedFileError,
    UnsupportedCodecError,
    UnsupportedVersionError,
)
from kvfast.format import KvfReader, Manifest, save_kv
from kvfast.format import open_kvf as open  # noqa: A001 - kvfast.open mirrors safetensors.safe_open
from kvfast.hf import GenerationOutput, PagedCache, VerifyReport, capture_kv, extend, generate, publish, verify
from kvfast.identity import block_hashes, checkpoint_fingerprint, document_key, fingerprint
from kvfast.load import LoadHandle, load, load_async, load_into
from kvfast.origin import Origin, OriginConfig
from kvfast.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats
from kvfast.trust.audit import AuditReport, audit
from kvfast.trust.ledger import Ledger
from kvfast.trust.signing import keygen, sign, verify_signature

__version__ = "0.1.0"

__all__ = [
    "CacheFullError", "ChecksumError", "CodecError", "DtypeMismatchError", "FormatError", "GenerationOutput", "KVSequence",
    "KVPages", "KvfReader", "KvfastError", "LoadHandle", "LayoutError", "Manifest", "ManifestError", "ModelMismatchError", "NotKvfError",
    "PagedCache", "PagedKVCache", "PagesError", "ShapeMismatchError", "Store", "StoreEntry", "StoreKey", "StoreMatch",
    "StoreStats", "TokenMismatchError", "TruncatedFileError",
    "UnsupportedCodecError", "UnsupportedVersionError", "VerifyReport", "backend", "block_hashes", "capture_kv",
    "checkpoint_fingerprint", "document_key", "extend", "fingerprint", "generate", "load", "load_async", "load_into", "open",
    "publish", "save_kv", "verify",
    "Origin", "OriginConfig", "OriginError",
    "AuditReport", "Ledger", "LedgerError", "SignatureError", "audit", "keygen", "sign", "verify_signature",
]
