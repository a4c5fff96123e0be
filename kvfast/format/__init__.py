"""The .kvf file (docs/FORMAT.md): its constants and types, the manifest's validation, the writer, the reader,
and the chunk codecs (``codec/``)."""
from kvfast.format.reader import KvfReader, open_kvf
from kvfast.format.spec import (
    ALIGN,
    DTYPE_NAMES,
    DTYPES,
    MAGIC,
    MAX_MANIFEST_BYTES,
    PREAMBLE,
    ChunkInfo,
    Manifest,
    dtype_name,
    token_bytes,
    token_sha256,
)
from kvfast.format.writer import save_kv

__all__ = ["ALIGN", "DTYPES", "DTYPE_NAMES", "MAGIC", "MAX_MANIFEST_BYTES", "PREAMBLE", "ChunkInfo", "KvfReader",
           "Manifest", "dtype_name", "open_kvf", "save_kv", "token_bytes", "token_sha256"]
