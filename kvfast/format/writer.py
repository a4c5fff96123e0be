"""Writing a .kvf file: chunk, encode, checksum, lay out (§2) and commit atomically (temp file, fsync, rename)."""
from __future__ import annotations

import errno
import hashlib
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvfast._backend import crc32c
from kvfast._fs import DEFAULT_THREADS, atomic_write
from kvfast.errors import FileAccessError, UnsupportedCodecError, file_access_error
from kvfast.format import codec as codecs
from kvfast.format.manifest import validate_manifest
from kvfast.format.spec import (
    DTYPES,
    MAGIC,
    MAX_CHUNK_TOKENS,
    MAX_LAYERS,
    MAX_MANIFEST_BYTES,
    PREAMBLE,
    VERSION,
    Manifest,
    align_up,
    chunk_ranges,
    dtype_name,
    region_offsets,
    token_bytes,
)


def save_kv(
    path: str | os.PathLike,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    token_ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    fingerprint: str,
    chunk_tokens: int = 256,
    codec: str = "raw",
    model_config: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:  # long: the format's write path, top to bottom in the order of docs/FORMAT.md
    """Write a document's KV cache as a .kvf file, atomically.

    Args:
        path: destination. Written to a temporary file in the same folder, fsynced, then renamed, so a
            crash leaves either no file or the complete one.
        keys, values: one tensor per layer, each ``[num_tokens, num_kv_heads, head_dim]``, all of one
            dtype (float32, float16 or bfloat16), on any device.
        token_ids: the ``num_tokens`` token ids the KV was computed from.
        fingerprint: the model's fingerprint (:func:`kvfast.fingerprint`); loads are refused for others.
        chunk_tokens: tokens per chunk (one chunk = one layer x one token range).
        codec: how chunks are stored: ``"raw"`` (default), or ``"lossless"`` (= ``"expcode-v2"``) for the
            lossless exponent codec (§7.1-7.2; typically 1.5x smaller for bf16 KV, decoded bit-exactly);
            ``"expcode-v1"`` writes files that kvfast versions without v2 can read.
        model_config: the model's KV-shaping config fields, recorded for people and checks.
        tokenizer: an optional tokenizer fingerprint.
        metadata: free-form string pairs.

    Returns:
        The path written.

    Example:
        >>> k = [torch.zeros(5, 2, 8, dtype=torch.bfloat16)]
        >>> kvfast.save_kv("doc.kvf", k, k, [1, 2, 3, 4, 5], fingerprint="sha256:...")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        codec = codecs.resolve(codec)
    except UnsupportedCodecError as exc:
        raise UnsupportedCodecError(str(exc), path=path) from None
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral) \
            or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens must be an integer in [1, {MAX_CHUNK_TOKENS}], got {chunk_tokens!r}")
    chunk_tokens = int(chunk_tokens)
    if len(keys) != len(values) or not 1 <= len(keys) <= MAX_LAYERS:
        raise ValueError(f"keys and values need the same number of layers (1..{MAX_LAYERS}), "
                         f"got {len(keys)} and {len(values)}")
    ids = token_bytes(token_ids)
    num_tokens = len(ids) // 4
    shape = tuple(keys[0].shape)
    if len(shape) != 3 or shape[0] != num_tokens or num_tokens == 0:
        raise ValueError(f"each layer's K and V must be [num_tokens={num_tokens}, num_kv_heads, head_dim] "
                         f"with num_tokens >= 1, got {shape}")
    dtype = keys[0].dtype
    for name, tensors in (("keys", keys), ("values", values)):
        for layer, t in enumerate(tensors):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}[{layer}] is {tuple(t.shape)} {t.dtype}; expected {shape} {dtype}")
    manifest = Manifest(
        fingerprint=fingerprint,
        config=dict(model_config or {}),
        tokenizer=tokenizer,
        num_layers=len(keys),
        num_kv_heads=shape[1],
        head_dim=shape[2],
        dtype=DTYPES[dtype_name(dtype)],
        num_tokens=num_tokens,
        token_sha256=hashlib.sha256(ids).hexdigest(),
        codec=codec,
        checksum="crc32c",
        chunk_tokens=chunk_tokens,
        metadata=dict(metadata or {}),
    )
    validate_manifest(manifest, path)

    # Chunk payloads are views into one contiguous CPU copy of each layer: nothing is copied twice.
    row = manifest.token_row_bytes
    payloads: list[tuple[memoryview, memoryview]] = []
    for k, v in zip(keys, values):
        kb = memoryview(_host_bytes(k))
        vb = memoryview(_host_bytes(v))
        for a, b in chunk_ranges(num_tokens, chunk_tokens):
            payloads.append((kb[a * row : b * row], vb[a * row : b * row]))
    stored = _encode_chunks(codec, payloads, manifest)
    lengths = [sum(len(p) for p in parts) for parts in stored]
    _, offsets = region_offsets(manifest, lengths)
    body = manifest.to_json()
    body["tokens"].update(offset=0, length=len(ids), crc32c=crc32c(ids))
    body["chunks"] = [[o, n, len(k) + len(v), _crc_parts(parts)]
                      for o, n, (k, v), parts in zip(offsets, lengths, payloads, stored)]
    manifest_bytes = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest would be {len(manifest_bytes)} bytes (> {MAX_MANIFEST_BYTES}); "
                         "use a larger chunk_tokens")
    preamble = PREAMBLE.pack(MAGIC, VERSION, len(manifest_bytes), crc32c(manifest_bytes), 0)
    data_start = align_up(PREAMBLE.size + len(manifest_bytes))

    def write_regions(f) -> None:
        for start, parts in ((0, [preamble, manifest_bytes]), (data_start, [ids]),
                             *((data_start + off, parts) for off, parts in zip(offsets, stored))):
            f.write(b"\0" * (start - f.tell()))
            for p in parts:
                f.write(p)

    if path.is_dir():
        raise FileAccessError("is a folder; give the .kvf file to write", path=path, errno=errno.EISDIR)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_access_error(exc, path.parent, "creating the folder") from None
    try:
        atomic_write(path, write_regions)
    except OSError as exc:  # the temporary file is gone and ``path`` untouched: say so, naming the user's path
        why = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise FileAccessError(f"writing it failed ({why}); nothing was written", path=path, errno=exc.errno) from exc
    return path


def _encode_chunks(codec: str, payloads: list[tuple[memoryview, memoryview]],
                   m: Manifest) -> list[Sequence[memoryview | bytes]]:
    """Each chunk's stored bytes (§7), as parts to write back to back: for ``"raw"`` the K and V views as they
    are (no copy), else the codec's output, encoded on a few threads (the C++ encoder releases the GIL)."""
    if codec == "raw":
        return list(payloads)
    item = m.dtype.itemsize

    def encode(kv: tuple[memoryview, memoryview]) -> list[bytes]:
        k, v = (np.frombuffer(x, dtype=np.uint8).reshape(-1, m.num_kv_heads, m.head_dim * item) for x in kv)
        return [codecs.encode_chunk(codec, k, v, item)]

    if DEFAULT_THREADS == 1 or len(payloads) == 1:
        return [encode(p) for p in payloads]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(DEFAULT_THREADS, thread_name_prefix="kvfast-encode") as pool:
        return list(pool.map(encode, payloads))


def _crc_parts(parts: Sequence[memoryview | bytes]) -> int:
    value = 0
    for p in parts:
        value = crc32c(p, value)
    return value


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU copy of ``t`` as a flat uint8 array (bit-exact; no dtype conversion)."""
    return t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
