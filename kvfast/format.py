"""The .kvf file, format v1: write it atomically, read it trusting nothing.

docs/FORMAT.md is the specification; section numbers (§) in this module point into it.

    [preamble 24 B][manifest JSON][zero pad to 4096]  <- data section starts here (offsets are relative to it)
    [token ids, u32 LE][pad][chunk 0][pad][chunk 1]... <- chunks layer-major, each at a 4096-aligned offset
"""
from __future__ import annotations

import errno
import hashlib
import json
import numbers
import os
import secrets
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvfast import codec as codecs
from kvfast._backend import crc32c
from kvfast.errors import (
    ChecksumError,
    FileAccessError,
    LayoutError,
    ManifestError,
    NotKvfError,
    TruncatedFileError,
    UnsupportedCodecError,
    UnsupportedVersionError,
    file_access_error,
)

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

# -- §4 dtypes ------------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CODECS = codecs.CODECS  # §7; user-facing aliases ("lossless") resolve through kvfast.codec.resolve
ENCODE_THREADS = min(4, os.cpu_count() or 1)  # chunks encoded at once (the C++ encoder releases the GIL)
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


def layout(manifest: Manifest, chunk_lengths: Sequence[int]) -> tuple[int, list[int]]:
    """The canonical layout (§2): (token ids offset, chunk offsets), relative to the data section."""
    offsets = []
    end = 4 * manifest.num_tokens
    for n in chunk_lengths:
        offsets.append(align_up(end))
        end = offsets[-1] + n
    return 0, offsets


# -- writing --------------------------------------------------------------------------------------------
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
) -> Path:
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
    _validate_manifest(manifest, path)

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
    _, offsets = layout(manifest, lengths)
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

    def write_region(f, start: int, parts: Sequence[memoryview | bytes]) -> None:
        f.write(b"\0" * (start - f.tell()))
        for p in parts:
            f.write(p)

    if path.is_dir():
        raise FileAccessError("is a folder; give the .kvf file to write", path=path, errno=errno.EISDIR)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise file_access_error(exc, path.parent, "creating the folder") from None
    # Not tempfile.mkstemp: its 0600 mode would survive the rename. O_EXCL with 0666 lets the umask decide.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise file_access_error(exc, path, "writing") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_region(f, 0, [preamble, manifest_bytes])
            write_region(f, data_start, [ids])
            for off, parts in zip(offsets, stored):
                write_region(f, data_start + off, parts)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        # The temporary file is gone and ``path`` untouched: say so, naming the user's path, not the temporary
        why = "no space left on the device" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
        raise FileAccessError(f"writing it failed ({why}); nothing was written", path=path, errno=exc.errno) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
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

    if ENCODE_THREADS == 1 or len(payloads) == 1:
        return [encode(p) for p in payloads]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="kvfast-encode") as pool:
        return list(pool.map(encode, payloads))


def _crc_parts(parts: Sequence[memoryview | bytes]) -> int:
    value = 0
    for p in parts:
        value = crc32c(p, value)
    return value


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU copy of ``t`` as a flat uint8 array (bit-exact; no dtype conversion)."""
    return t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: fsync the folder that holds the new name (a no-op where unsupported)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# -- reading --------------------------------------------------------------------------------------------
class KvfReader:
    """An open .kvf file whose preamble, manifest, layout and token ids have been validated.

    Chunk bytes are read and checked on demand. Use :func:`kvfast.open` to create one; close it (or use
    ``with``) to release the file descriptor.

    Attributes:
        path: the file.
        manifest: the validated :class:`Manifest`.
        token_ids: ``[num_tokens]`` int64 tensor.
        chunks: every :class:`ChunkInfo`, layer-major.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():  # os.open would succeed on a folder and fail at the first read, naming nothing
            raise FileAccessError("is a folder, expected a .kvf file", path=self.path, errno=errno.EISDIR)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise file_access_error(exc, self.path, "opening") from None
        try:
            self._file_size = os.fstat(self._fd).st_size
            self.manifest, self.chunks, self.data_start, tokens = self._parse()
            self.token_ids = self._read_token_ids(tokens)
        except BaseException:
            self.close()
            raise

    # Size checks come before every read, so a hostile length never allocates or reads past the file.
    def _pread(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self._file_size:
            raise TruncatedFileError(
                f"{what} spans bytes [{offset}, {offset + length}) but the file has {self._file_size} bytes",
                path=self.path,
            )
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # the file shrank after we opened it
            raise TruncatedFileError(f"{what}: short read at offset {offset}", path=self.path)
        return data

    def _parse(self) -> tuple[Manifest, list[ChunkInfo], int, dict[str, int]]:
        head = os.pread(self._fd, PREAMBLE.size, 0)
        if head[: len(MAGIC)] != MAGIC[: len(head)]:
            raise NotKvfError("not a .kvf file (wrong magic bytes; §1 of docs/FORMAT.md)", path=self.path)
        if len(head) < PREAMBLE.size:
            raise TruncatedFileError(f"file has {len(head)} bytes, shorter than the {PREAMBLE.size}-byte "
                                     "preamble", path=self.path)
        _, version, manifest_len, manifest_crc, reserved = PREAMBLE.unpack(head)
        if version != VERSION:
            raise UnsupportedVersionError(f"format version {version} is not supported (this kvfast reads "
                                          f"version {VERSION}); upgrade kvfast", path=self.path)
        if reserved != 0:
            raise LayoutError(f"preamble reserved field is {reserved}, must be 0 (§1)", path=self.path)
        if manifest_len > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest length {manifest_len} exceeds the {MAX_MANIFEST_BYTES}-byte limit "
                                "(§1)", path=self.path)
        raw = self._pread(PREAMBLE.size, manifest_len, "manifest")
        if crc32c(raw) != manifest_crc:
            raise ChecksumError("manifest checksum mismatch: the manifest is corrupted", path=self.path)
        body = _parse_json(raw, self.path)
        manifest, tokens, raw_chunks = _manifest_from_json(body, self.path)
        data_start = align_up(PREAMBLE.size + manifest_len)
        chunks = self._check_layout(manifest, tokens, raw_chunks, data_start)
        return manifest, chunks, data_start, tokens

    def _check_layout(self, m: Manifest, tokens: dict[str, int], raw_chunks: list[list[int]],
                      data_start: int) -> list[ChunkInfo]:
        expected_count = m.num_layers * m.chunks_per_layer
        if len(raw_chunks) != expected_count:
            raise LayoutError(f"manifest lists {len(raw_chunks)} chunks; {m.num_layers} layers x "
                              f"{m.chunks_per_layer} token ranges need {expected_count} (§6)", path=self.path)
        if tokens["offset"] != 0 or tokens["length"] != 4 * m.num_tokens:
            raise LayoutError(f"tokens region must be at offset 0 with length {4 * m.num_tokens} (§5), got "
                              f"offset {tokens['offset']} length {tokens['length']}", path=self.path)
        ranges = chunk_ranges(m.num_tokens, m.chunk_tokens)
        _, canonical = layout(m, [c[1] for c in raw_chunks])
        chunks = []
        for i, ((offset, length, raw_length, crc), want_offset) in enumerate(zip(raw_chunks, canonical)):
            layer, (a, b) = divmod(i, len(ranges))[0], ranges[i % len(ranges)]
            where = f"chunk {i} (layer {layer}, tokens {a}:{b})"
            if offset != want_offset:
                raise LayoutError(f"{where} offset {offset} is not the canonical {want_offset} (§2)",
                                  path=self.path)
            want_raw = 2 * (b - a) * m.token_row_bytes
            if raw_length != want_raw:
                raise LayoutError(f"{where} raw_length {raw_length} != 2*{b - a}*{m.token_row_bytes} = "
                                  f"{want_raw} (§6)", path=self.path)
            if m.codec == "raw" and length != raw_length:
                raise LayoutError(f"{where} stored length {length} != raw length {raw_length} for codec "
                                  "'raw' (§7)", path=self.path)
            if length > raw_length:  # §7.1: a chunk that does not get smaller is stored verbatim
                raise LayoutError(f"{where} stored length {length} exceeds its raw length {raw_length} (§7)",
                                  path=self.path)
            chunks.append(ChunkInfo(i, layer, a, b, data_start + offset, length, raw_length, crc))
        end = chunks[-1].offset + chunks[-1].length
        if self._file_size < end:
            raise TruncatedFileError(f"file has {self._file_size} bytes; its manifest needs {end}",
                                     path=self.path)
        if self._file_size > end:
            raise LayoutError(f"file has {self._file_size - end} trailing bytes after the last chunk (§2)",
                              path=self.path)
        return chunks

    def _read_token_ids(self, tokens: dict[str, int]) -> torch.Tensor:
        raw = self._pread(self.data_start, tokens["length"], "token ids")
        if crc32c(raw) != tokens["crc32c"]:
            raise ChecksumError("token ids checksum mismatch: the token region is corrupted", path=self.path)
        if hashlib.sha256(raw).hexdigest() != self.manifest.token_sha256:
            raise ChecksumError("token ids do not match the manifest's tokens.sha256", path=self.path)
        return torch.from_numpy(np.frombuffer(raw, dtype="<u4").astype(np.int64))

    # -- public API -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    def chunk(self, layer: int, start_token: int) -> ChunkInfo:
        """The chunk of ``layer`` that holds token ``start_token``."""
        return self.chunks[layer * self.manifest.chunks_per_layer + start_token // self.manifest.chunk_tokens]

    def read_chunk(self, chunk: ChunkInfo, out: np.ndarray | None = None, *, verify: bool = True,
                   threads: int = 1, backend: str = "auto") -> np.ndarray:
        """Decoded bytes of one chunk, ``[raw_length]`` uint8: K ``[t, H, D]`` then V ``[t, H, D]``.

        ``out`` (uint8, ``raw_length`` bytes, C-contiguous) is filled in place when given. Raises
        :class:`ChecksumError` naming the chunk when ``verify`` and its bytes do not match the checksum, and
        :class:`kvfast.codec.CodecError` when a coded chunk's bytes are inconsistent. ``threads`` and ``backend``
        (``"auto"``, ``"native"``, ``"python"``) choose the decoder of coded chunks (:mod:`kvfast.codec`).
        """
        if out is None:
            out = np.empty(chunk.raw_length, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.nbytes != chunk.raw_length or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 array of {chunk.raw_length} bytes")
        if chunk.length == chunk.raw_length:  # raw, or stored verbatim (§7.1): read straight into out
            return self.read_stored(chunk, out, verify=verify)
        m = self.manifest
        try:
            return codecs.decode_chunk(m.codec, self.read_stored(chunk, verify=verify), out, chunk.stop - chunk.start,
                                       m.num_kv_heads, m.head_dim, m.dtype.itemsize, where=_where(chunk),
                                       backend=backend, threads=threads)
        except codecs.CodecError as exc:
            raise codecs.CodecError(str(exc), path=self.path) from None

    def read_stored(self, chunk: ChunkInfo, out: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """The ``length`` stored bytes of one chunk (uint8), as the codec wrote them (§7); checked like
        :meth:`read_chunk`. ``out`` (uint8, ``length`` bytes, C-contiguous) is filled in place when given."""
        if out is None:
            out = np.empty(chunk.length, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.nbytes != chunk.length or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 array of {chunk.length} bytes")
        if chunk.offset + chunk.length > self._file_size:
            raise TruncatedFileError(f"chunk {chunk.index} ends past the end of the file", path=self.path)
        done = 0
        view = memoryview(out)
        while done < chunk.length:
            n = os.preadv(self._fd, [view[done:]], chunk.offset + done)
            if n == 0:
                raise TruncatedFileError(f"chunk {chunk.index}: short read (the file shrank?)", path=self.path)
            done += n
        if verify and crc32c(out) != chunk.crc32c:
            raise ChecksumError(f"{_where(chunk)} checksum mismatch: the file is corrupted; re-publish or fetch it "
                                "again", path=self.path)
        return out

    def split_chunk(self, chunk: ChunkInfo, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Views K and V, each ``[t, H, D]`` of the file's dtype, into a chunk's decoded bytes."""
        m = self.manifest
        kv = torch.from_numpy(data).view(m.dtype).view(2, chunk.stop - chunk.start, m.num_kv_heads, m.head_dim)
        return kv[0], kv[1]

    def read_layer(self, layer: int, start: int = 0, stop: int | None = None, *,
                   verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer for tokens ``[start, stop)``, each ``[stop - start, H, D]`` (CPU, new tensors)."""
        m = self.manifest
        stop = m.num_tokens if stop is None else stop
        if not 0 <= layer < m.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {m.num_layers})")
        if not 0 <= start <= stop <= m.num_tokens:
            raise IndexError(f"token range {start}:{stop} not within [0, {m.num_tokens}]")
        k = torch.empty(stop - start, m.num_kv_heads, m.head_dim, dtype=m.dtype)
        v = torch.empty_like(k)
        pos = start
        while pos < stop:
            c = self.chunk(layer, pos)
            ck, cv = self.split_chunk(c, self.read_chunk(c, verify=verify))
            end = min(stop, c.stop)
            k[pos - start : end - start] = ck[pos - c.start : end - c.start]
            v[pos - start : end - start] = cv[pos - c.start : end - c.start]
            pos = end
        return k, v

    def verify(self) -> None:
        """Read every chunk and check its checksum; raises :class:`ChecksumError` at the first bad one."""
        buf = np.empty(max(c.raw_length for c in self.chunks), dtype=np.uint8)
        for c in self.chunks:
            self.read_chunk(c, buf[: c.raw_length])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> KvfReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"KvfReader({str(self.path)!r}, tokens={m.num_tokens}, layers={m.num_layers}, "
                f"kv_heads={m.num_kv_heads}, head_dim={m.head_dim}, dtype={DTYPE_NAMES[m.dtype]}, "
                f"codec={m.codec!r})")


def _where(chunk: ChunkInfo) -> str:
    return f"chunk {chunk.index} (layer {chunk.layer}, tokens {chunk.start}:{chunk.stop})"


def open_kvf(path: str | os.PathLike) -> KvfReader:
    """Open and validate a .kvf file (exported as ``kvfast.open``).

    Raises a :class:`kvfast.errors.FormatError` subclass naming the file and the field at fault when the
    preamble, manifest, layout or token ids are invalid; chunk checksums are checked when chunks are read.

    Example:
        >>> with kvfast.open("doc.kvf") as r:  # doctest: +SKIP
        ...     k, v = r.read_layer(0, 0, 16)   # each [16, H, D]
    """
    return KvfReader(path)


# -- §3 manifest validation -----------------------------------------------------------------------------
def _parse_json(raw: bytes, path: Path) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ManifestError(f"manifest has a duplicated key among {sorted(keys)}", path=path)
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ManifestError(f"manifest contains {name}, which JSON does not allow", path=path)

    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except ManifestError:  # from the hooks above; a ValueError too, so it must pass before the next clause
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, and int()
        # refusing a literal longer than sys.get_int_max_str_digits() (4300 digits by default)
        raise ManifestError(f"manifest is not valid UTF-8 JSON: {exc}", path=path) from None
    if not isinstance(body, dict):
        raise ManifestError("manifest must be a JSON object", path=path)
    return body


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"manifest field {where}{key} is missing", path=path)
    value = obj[key]
    # bool is an int in Python; a manifest that says `true` for a count is malformed
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ManifestError(f"manifest field {where}{key} has type {type(value).__name__}, expected "
                            f"{'/'.join(t.__name__ for t in _as_tuple(kind))}", path=path)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _int_field(obj: Any, key: str, lo: int, hi: int, path: Path, where: str = "") -> int:
    value = _field(obj, key, int, path, where)
    if not lo <= value <= hi:
        raise ManifestError(f"manifest field {where}{key} = {value} is outside [{lo}, {hi}]", path=path)
    return value


def _manifest_from_json(body: dict[str, Any], path: Path) -> tuple[Manifest, dict[str, int], list[list[int]]]:
    model = _field(body, "model", dict, path, "")
    kv = _field(body, "kv", dict, path, "")
    tokens = _field(body, "tokens", dict, path, "")
    dtype = _field(kv, "dtype", str, path, "kv.")
    if dtype not in DTYPES:
        raise ManifestError(f"kv.dtype {dtype!r} is not one of {sorted(DTYPES)}", path=path)
    codec = _field(body, "codec", str, path, "")
    if codec not in CODECS:
        raise UnsupportedCodecError(f"codec {codec!r} is not supported by this kvfast (knows {list(CODECS)}); "
                                    "upgrade kvfast", path=path)
    checksum = _field(body, "checksum", str, path, "")
    if checksum not in CHECKSUMS:
        raise ManifestError(f"checksum {checksum!r} is not one of {list(CHECKSUMS)}", path=path)
    tokenizer = body.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ManifestError("manifest field tokenizer must be a string or null", path=path)
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ManifestError("manifest field metadata must map strings to strings", path=path)
    sha = _field(tokens, "sha256", str, path, "tokens.")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError("tokens.sha256 must be 64 lowercase hex digits", path=path)
    manifest = Manifest(
        fingerprint=_field(model, "fingerprint", str, path, "model."),
        config=_field(model, "config", dict, path, "model."),
        tokenizer=tokenizer,
        num_layers=_int_field(kv, "num_layers", 1, MAX_LAYERS, path, "kv."),
        num_kv_heads=_int_field(kv, "num_kv_heads", 1, MAX_KV_HEADS, path, "kv."),
        head_dim=_int_field(kv, "head_dim", 1, MAX_HEAD_DIM, path, "kv."),
        dtype=DTYPES[dtype],
        num_tokens=_int_field(tokens, "count", 1, MAX_TOKENS, path, "tokens."),
        token_sha256=sha,
        codec=codec,
        checksum=checksum,
        chunk_tokens=_int_field(body, "chunk_tokens", 1, MAX_CHUNK_TOKENS, path),
        metadata=metadata,
    )
    token_region = {
        "offset": _int_field(tokens, "offset", 0, 1 << 62, path, "tokens."),
        "length": _int_field(tokens, "length", 0, 1 << 62, path, "tokens."),
        "crc32c": _int_field(tokens, "crc32c", 0, 0xFFFFFFFF, path, "tokens."),
    }
    raw_chunks = _field(body, "chunks", list, path, "")
    limits = ((0, 1 << 62), (0, 1 << 62), (0, 1 << 62), (0, 0xFFFFFFFF))
    for i, c in enumerate(raw_chunks):
        if (not isinstance(c, list) or len(c) != 4
                or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
                           for x, (lo, hi) in zip(c, limits))):
            raise ManifestError(f"chunks[{i}] must be [offset, length, raw_length, crc32c] of non-negative "
                                f"integers in range, got {str(c)[:80]}", path=path)
    return manifest, token_region, raw_chunks


def _validate_manifest(m: Manifest, path: Path) -> None:
    """The writer's side of §3: refuse to write what the reader would refuse to read."""
    if not (1 <= m.num_kv_heads <= MAX_KV_HEADS and 1 <= m.head_dim <= MAX_HEAD_DIM
            and 1 <= m.num_tokens <= MAX_TOKENS):
        raise ValueError(f"{path}: KV shape out of the format's limits (§3)")
    if not isinstance(m.fingerprint, str):
        raise ValueError(f"fingerprint must be a string (kvfast.fingerprint(model)), got {m.fingerprint!r}")
    if m.tokenizer is not None and not isinstance(m.tokenizer, str):
        raise ValueError(f"tokenizer must be a string or None, got {m.tokenizer!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.metadata.items()):
        raise ValueError("metadata must map strings to strings")
    json.dumps(m.to_json(), allow_nan=False)  # config must be plain JSON
