"""Chunk codecs: how a chunk's bytes are stored (docs/FORMAT.md §7). The registry and the one dispatch point.

- ``"raw"``: the decoded bytes themselves.
- ``"expcode-v1"``: exponents Huffman-coded, sign and mantissa stored raw (:mod:`kvfast.format.codec.expcode`, §7.1).
- ``"expcode-v2"`` (alias ``"lossless"``): the same, and a K or V row that repeats an earlier row of its chunk is
  stored as a reference to it (§7.2).

A coded chunk that would not get smaller is stored verbatim, which the reader recognises by
``length == raw_length``.

Encoders and decoders exist twice: the C++ one in ``kvfast._C`` (multi-threaded, GIL released) and the numpy
reference; ``backend="auto"`` picks the C++ one when it is built. Both write and read the same bytes. A GPU
decoder that writes straight into a paged cache is in ``kvfast.kernels.expcode``.

Example:
    >>> resolve("lossless")
    'expcode-v2'
"""
from __future__ import annotations

import numpy as np

from kvfast._backend import native
from kvfast.format.codec import expcode
from kvfast.errors import CodecError
from kvfast.errors import UnsupportedCodecError

__all__ = ["ALIASES", "CODECS", "CodecError", "decode_chunk", "encode_chunk", "resolve"]

CODECS = ("raw", *expcode.NAMES)  # the names a manifest may carry, versioned
ALIASES = {"lossless": "expcode-v2"}  # what a user may ask for: the best lossless codec of this kvfast
BACKENDS = ("auto", "native", "python")
DEFAULT_THREADS = 1  # per chunk; callers that decode several chunks at once parallelise over chunks
THREAD_MIN_BYTES = 256 << 10  # starting a thread costs about what decoding this much output does


def resolve(name: str) -> str:
    """The manifest name for codec ``name`` (an alias resolves to the codec it stands for).

    Raises :class:`UnsupportedCodecError` naming the codecs this kvfast knows."""
    name = ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in CODECS:
        raise UnsupportedCodecError(f"codec {name!r} is not one of {[*CODECS, *ALIASES]}")
    return name


def _use_native(backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native" and native is None:
        raise RuntimeError("backend='native' needs kvfast._C, which is not built")
    return backend != "python" and native is not None


def encode_chunk(codec: str, k: np.ndarray, v: np.ndarray, itemsize: int, *, backend: str = "auto",
                 threads: int = DEFAULT_THREADS) -> bytes:
    """The stored bytes of one chunk: ``k`` and ``v`` are uint8 ``[t, H, head_dim * itemsize]`` views of its K and
    V (C-contiguous). For an ``expcode`` codec the coded bytes when they are shorter than K and V, else K and V
    verbatim (§7.1)."""
    raw = k.nbytes + v.nbytes
    if codec == "raw":
        return k.tobytes() + v.tobytes()
    t, heads, row = k.shape
    head_dim = row // itemsize
    seg_tokens = expcode.default_seg_tokens(head_dim, t)
    repeats = expcode.NAMES[codec]
    if _use_native(backend):
        coded = native.expcode_encode(k, v, t, heads, head_dim, itemsize, seg_tokens, threads, repeats=repeats)
    else:
        words = {2: "<u2", 4: "<u4"}[itemsize]
        coded = expcode.encode(k.view(words).reshape(t, heads, head_dim), v.view(words).reshape(t, heads, head_dim),
                               itemsize, seg_tokens, repeats)
    return coded if len(coded) < raw else k.tobytes() + v.tobytes()


def decode_chunk(codec: str, stored: np.ndarray, out: np.ndarray, num_tokens: int, num_heads: int, head_dim: int,
                 itemsize: int, *, where: str = "chunk", backend: str = "auto",
                 threads: int = DEFAULT_THREADS) -> np.ndarray:
    """Decode one chunk's stored bytes (uint8) into ``out`` (uint8, ``2 * t * H * head_dim * itemsize`` bytes,
    C-contiguous) and return ``out``. Raises :class:`CodecError` naming ``where`` and the field at fault."""
    if len(stored) == out.nbytes:  # raw, or a coded chunk that did not get smaller: stored verbatim
        out[...] = stored
        return out
    if codec == "raw":
        raise CodecError(f"{where}: {len(stored)} stored bytes for {out.nbytes} raw bytes with codec 'raw'")
    if _use_native(backend):
        threads = max(1, min(threads, out.nbytes // THREAD_MIN_BYTES))
        try:
            native.expcode_decode(stored, out, num_tokens, num_heads, head_dim, itemsize, threads,
                                  repeats=expcode.NAMES[codec])
        except ValueError as exc:
            raise CodecError(f"{where}: {exc}") from None
    else:
        expcode.decode(stored, out, num_tokens, num_heads, head_dim, itemsize, where, expcode.NAMES[codec])
    return out
