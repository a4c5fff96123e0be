"""kvfast: compute a document's prefill once; load its KV cache, bit-exactly, everywhere else.

The public API (see README.md). Everything here is re-exported from the module that implements it.
"""
from kvfast._backend import backend
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
from kvfast.fingerprint import block_hashes, document_key, fingerprint
from kvfast.format import KvfReader, Manifest, save_kv
from kvfast.format import open_kvf as open  # noqa: A001 - kvfast.open mirrors safetensors.safe_open
from kvfast.generate import GenerationOutput, generate
from kvfast.hf import PagedCache, capture_kv, extend, publish
from kvfast.loader import load, load_async
from kvfast.paged import KVSequence, PagedKVCache
from kvfast.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats
from kvfast.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "CacheFullError", "ChecksumError", "DtypeMismatchError", "FormatError", "GenerationOutput", "KVSequence",
    "KvfReader", "KvfastError", "LayoutError", "Manifest", "ManifestError", "ModelMismatchError", "NotKvfError",
    "PagedCache", "PagedKVCache", "ShapeMismatchError", "Store", "StoreEntry", "StoreKey", "StoreMatch",
    "StoreStats", "TokenMismatchError", "TruncatedFileError",
    "UnsupportedCodecError", "UnsupportedVersionError", "VerifyReport", "backend", "block_hashes", "capture_kv",
    "document_key", "extend", "fingerprint", "generate", "load", "load_async", "open", "publish", "save_kv", "verify",
]
