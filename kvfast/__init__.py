"""kvfast: compute a document's prefill once; load its KV cache, bit-exactly, everywhere else.

The public API (see README.md). Everything here is re-exported from the module that implements it.
"""
from kvfast._backend import backend
from kvfast.codec import CodecError
from kvfast.errors import (
    CacheFullError,
    ChecksumError,
    DtypeMismatchError,
    FormatError,
    KvfastError,
    LayoutError,
    ManifestError,
    ModelMismatchError,
    NotKvfError,
    ShapeMismatchError,
    TokenMismatchError,
    TruncatedFileError,
    UnsupportedCodecError,
    UnsupportedVersionError,
)
from kvfast.fingerprint import block_hashes, checkpoint_fingerprint, document_key, fingerprint
from kvfast.format import KvfReader, Manifest, save_kv
from kvfast.format import open_kvf as open  # noqa: A001 - kvfast.open mirrors safetensors.safe_open
from kvfast.generate import GenerationOutput, generate
from kvfast.hf import PagedCache, capture_kv, extend, publish
from kvfast.loader import load, load_async
from kvfast.paged import KVSequence, PagedKVCache
from kvfast.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats
from kvfast.verify import VerifyReport, verify
from kvfast.audit import AuditReport, audit
from kvfast.ledger import Ledger, LedgerError
from kvfast.sign import SignatureError, keygen, sign, verify_signature

__version__ = "0.1.0"

__all__ = [
    "CacheFullError", "ChecksumError", "CodecError", "DtypeMismatchError", "FormatError", "GenerationOutput", "KVSequence",
    "KvfReader", "KvfastError", "LayoutError", "Manifest", "ManifestError", "ModelMismatchError", "NotKvfError",
    "PagedCache", "PagedKVCache", "ShapeMismatchError", "Store", "StoreEntry", "StoreKey", "StoreMatch",
    "StoreStats", "TokenMismatchError", "TruncatedFileError",
    "UnsupportedCodecError", "UnsupportedVersionError", "VerifyReport", "backend", "block_hashes", "capture_kv",
    "checkpoint_fingerprint", "document_key", "extend", "fingerprint", "generate", "load", "load_async", "open",
    "publish", "save_kv", "verify",
    "AuditReport", "Ledger", "LedgerError", "SignatureError", "audit", "keygen", "sign", "verify_signature",
]
