"""The .kvf format v1 in constants and types: preamble, limits, dtypes, token ids, the parsed manifest.

docs/FORMAT.md is the specification; section numbers (§) in kvfast.format point into it.

    [preamble 24 B][manifest JSON][zero pad to 4096]  <- data section starts here (offsets are relative to it)
    [token ids, u32 LE][pad][chunk 0][pad][chunk 1]... <- chunks layer-major, each at a 4096-aligned offset
"""
from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvfast.format import codec as codecs

# -- §1 preamble ----------------------------------------------------------------------------------------
MAGIC = b"\x89KVF\r\n\x1a\n"  # high bit, CR LF, ^Z, LF: any text-mode or 7-bit damage changes it
VERSION = 1
PREAMBLE = struct.Struct("<8sIIII")  # magic, version, manifest_len, manifest_crc32c, reserved (0)
ALIGN = 4096  # every region of the data section starts at a multiple of this (mmap, O_DIRECT)
MAX_MANIFEST_BYTES = 16 << 20

# -- §3 limits: generous for real models, tight enough that no size computed from them is absurd -------
MAX_LAYERS = 4096
MAX_KV_HEADS = 4096
MAX_HEAD_DIM = 65536
MAX_TOKENS = 1 << 31
MAX_CHUNK_TOKENS = 1 << 20
# §6: decoded bytes of one chunk (K and V). Readers decode a whole chunk at a time, so this bounds their memory
# whatever a (compressed, tiny) file claims; 16x the largest chunk a 256-token default needs for known models.
MAX_CHUNK_BYTES = 256 << 20

# -- §4 dtypes ------------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CODECS = codecs.CODECS  # §7; user-facing aliases ("lossless") resolve through kvfast.format.codec.resolve
CHECKSUMS = ("crc32c",)

if sys.byteorder != "little":  # the format is little-endian and kvfast copies bytes without swapping
    raise ImportError("kvfast supports little-endian hosts only")


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def dtype_name(dtype: torch.dtype) -> str:
    """The manifest's name for a torch dtype (``"bfloat16"``...); ``ValueError`` for unsupported ones."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}") from None


def token_array(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Token ids as a flat ``[n]`` int64 array: the one normalisation every caller's ids go through (hashing and
    comparing it is far cheaper than a Python list)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    return np.asarray(token_ids, dtype=np.int64).reshape(-1)


def token_bytes(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes:
    """Token ids as the file stores them (§5): u32 little-endian. Raises ``ValueError`` outside [0, 2**32)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {tuple(ids.shape)}")
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= 1 << 32):
        raise ValueError("token ids must be integers in [0, 2**32)")
    return ids.astype("<u4").tobytes()


def token_sha256(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
    """SHA-256 (hex) of the token ids in their stored form: the file's identity of its document."""
    return hashlib.sha256(token_bytes(token_ids)).hexdigest()


# -- the parsed manifest --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkInfo:
    """One chunk (§6): K then V of layer ``layer`` for tokens ``[start, stop)``, each ``[stop-start, H, D]``."""

    index: int
    layer: int
    start: int
    stop: int
    offset: int  # absolute file offset of the stored bytes
    length: int  # stored bytes
    raw_length: int  # decoded bytes: 2 * (stop - start) * H * D * itemsize
    crc32c: int  # of the stored bytes


@dataclass(frozen=True)
class Manifest:
    """The validated manifest (§3). ``config`` holds the model's KV-shaping fields, for people and checks."""

    fingerprint: str
    config: Mapping[str, Any]
    tokenizer: str | None
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    num_tokens: int
    token_sha256: str
    codec: str
    checksum: str
    chunk_tokens: int
    metadata: Mapping[str, str]

    @property
    def chunks_per_layer(self) -> int:
        return -(-self.num_tokens // self.chunk_tokens)

    @property
    def token_row_bytes(self) -> int:
        """Bytes of one token of one layer's K (or V): ``H * D * itemsize``."""
        return self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"fingerprint": self.fingerprint, "config": dict(self.config)},
            "tokenizer": self.tokenizer,
            "kv": {
                "num_layers": self.num_layers,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "dtype": DTYPE_NAMES[self.dtype],
            },
            "tokens": {"count": self.num_tokens, "sha256": self.token_sha256},
            "codec": self.codec,
            "checksum": self.checksum,
            "chunk_tokens": self.chunk_tokens,
            "metadata": dict(self.metadata),
        }


def chunk_ranges(num_tokens: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Token ranges of one layer's chunks: ``[(0, T), (T, 2T), ..., (kT, N)]``."""
    return [(a, min(a + chunk_tokens, num_tokens)) for a in range(0, num_tokens, chunk_tokens)]


def region_offsets(manifest: Manifest, chunk_lengths: Sequence[int]) -> tuple[int, list[int]]:
    """The canonical layout (§2): (token ids offset, chunk offsets), relative to the data section."""
    offsets = []
    end = 4 * manifest.num_tokens
    for n in chunk_lengths:
        offsets.append(align_up(end))
        end = offsets[-1] + n
    return 0, offsets

