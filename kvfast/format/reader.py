"""Reading a .kvf file, trusting nothing: every offset and length is checked against the file and the manifest
before a byte is read; chunk checksums are checked as chunks are read (docs/FORMAT.md)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from kvfast._backend import crc32c
from kvfast._fs import open_regular, read_exact
from kvfast.errors import (
    ChecksumError,
    CodecError,
    LayoutError,
    ManifestError,
    NotKvfError,
    TruncatedFileError,
    UnsupportedVersionError,
)
from kvfast.format import codec as codecs
from kvfast.format.manifest import manifest_from_json, parse_json
from kvfast.format.spec import (
    DTYPE_NAMES,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_MANIFEST_BYTES,
    PREAMBLE,
    VERSION,
    ChunkInfo,
    Manifest,
    align_up,
    chunk_ranges,
    region_offsets,
)


VERIFY_PIECE_BYTES = 1 << 20  # bytes read and checksummed at a time by KvfReader.verify


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
        self._fd, st = open_regular(self.path)  # never blocks on a FIFO; refuses folders and devices
        try:
            self._file_size = st.st_size
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
        self._header_parts = [head, raw]  # the bytes parsed, for header_sha256 (never a second read of them)
        if crc32c(raw) != manifest_crc:
            raise ChecksumError("manifest checksum mismatch: the manifest is corrupted", path=self.path)
        body = parse_json(raw, self.path)
        manifest, tokens, raw_chunks = manifest_from_json(body, self.path)
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
        chunk_bytes = 2 * min(m.chunk_tokens, m.num_tokens) * m.token_row_bytes
        if chunk_bytes > MAX_CHUNK_BYTES:  # before any size derived from it is allocated
            raise LayoutError(f"chunks of {min(m.chunk_tokens, m.num_tokens)} tokens x {m.token_row_bytes}-byte "
                              f"rows hold {chunk_bytes} bytes (K and V), over the {MAX_CHUNK_BYTES}-byte limit "
                              "(§6)", path=self.path)
        ranges = chunk_ranges(m.num_tokens, m.chunk_tokens)
        _, canonical = region_offsets(m, [c[1] for c in raw_chunks])
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
        self._header_parts.append(raw)
        if crc32c(raw) != tokens["crc32c"]:
            raise ChecksumError("token ids checksum mismatch: the token region is corrupted", path=self.path)
        if hashlib.sha256(raw).hexdigest() != self.manifest.token_sha256:
            raise ChecksumError("token ids do not match the manifest's tokens.sha256", path=self.path)
        return torch.from_numpy(np.frombuffer(raw, dtype="<u4").astype(np.int64))

    # -- public API -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def header_sha256(self) -> str:
        """SHA-256 of every byte before the first chunk, over the preamble, manifest and token ids exactly as this
        reader parsed them (what a signature's ``header_sha256`` covers); only the zero padding between them is
        read again."""
        head, manifest, tokens = self._header_parts
        pad_a = self._pread(len(head) + len(manifest), self.data_start - len(head) - len(manifest), "padding")
        token_end = self.data_start + len(tokens)
        pad_b = self._pread(token_end, self.chunks[0].offset - token_end, "padding")
        digest = hashlib.sha256()
        for part in (head, manifest, pad_a, tokens, pad_b):
            digest.update(part)
        return digest.hexdigest()

    def chunk(self, layer: int, start_token: int) -> ChunkInfo:
        """The chunk of ``layer`` that holds token ``start_token``."""
        return self.chunks[layer * self.manifest.chunks_per_layer + start_token // self.manifest.chunk_tokens]

    def read_chunk(self, chunk: ChunkInfo, out: np.ndarray | None = None, *, verify: bool = True,
                   threads: int = 1, backend: str = "auto") -> np.ndarray:
        """Decoded bytes of one chunk, ``[raw_length]`` uint8: K ``[t, H, D]`` then V ``[t, H, D]``.

        ``out`` (uint8, ``raw_length`` bytes, C-contiguous) is filled in place when given. Raises
        :class:`ChecksumError` naming the chunk when ``verify`` and its bytes do not match the checksum, and
        :class:`kvfast.format.codec.CodecError` when a coded chunk's bytes are inconsistent. ``threads`` and ``backend``
        (``"auto"``, ``"native"``, ``"python"``) choose the decoder of coded chunks (:mod:`kvfast.format.codec`).
        """
        if out is None:
            out = np.empty(chunk.raw_length, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.nbytes != chunk.raw_length or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 array of {chunk.raw_length} bytes")
        if chunk.length == chunk.raw_length:  # raw, or stored verbatim (§7.1): read straight into out
            return self.read_stored(chunk, out, verify=verify)
        return self.decode_stored(chunk, self.read_stored(chunk, verify=verify), out, threads=threads,
                                  backend=backend)

    def decode_stored(self, chunk: ChunkInfo, stored: np.ndarray, out: np.ndarray, *, threads: int = 1,
                      backend: str = "auto") -> np.ndarray:
        """``out`` (``raw_length`` uint8) filled with the decoding of a chunk's ``stored`` bytes (from
        :meth:`read_stored`); the second half of :meth:`read_chunk`, for callers that also need the stored bytes."""
        if chunk.length == chunk.raw_length:
            out[:] = stored
            return out
        m = self.manifest
        try:
            return codecs.decode_chunk(m.codec, stored, out, chunk.stop - chunk.start, m.num_kv_heads, m.head_dim,
                                       m.dtype.itemsize, where=_where(chunk), backend=backend, threads=threads)
        except CodecError as exc:
            raise CodecError(str(exc), path=self.path) from None

    def read_stored(self, chunk: ChunkInfo, out: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        """The ``length`` stored bytes of one chunk (uint8), as the codec wrote them (§7); checked like
        :meth:`read_chunk`. ``out`` (uint8, ``length`` bytes, C-contiguous) is filled in place when given."""
        if out is None:
            out = np.empty(chunk.length, dtype=np.uint8)
        elif out.dtype != np.uint8 or out.nbytes != chunk.length or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous uint8 array of {chunk.length} bytes")
        if chunk.offset + chunk.length > self._file_size:
            raise TruncatedFileError(f"chunk {chunk.index} ends past the end of the file", path=self.path)
        if not read_exact(self._fd, memoryview(out), chunk.offset):
            raise TruncatedFileError(f"chunk {chunk.index}: short read (the file shrank?)", path=self.path)
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
        buf = np.empty(0, dtype=np.uint8)  # one decoded chunk at a time (at most MAX_CHUNK_BYTES)
        while pos < stop:
            c = self.chunk(layer, pos)
            if buf.nbytes < c.raw_length:
                buf = np.empty(c.raw_length, dtype=np.uint8)
            ck, cv = self.split_chunk(c, self.read_chunk(c, buf[: c.raw_length], verify=verify))
            end = min(stop, c.stop)
            k[pos - start : end - start] = ck[pos - c.start : end - c.start]
            v[pos - start : end - start] = cv[pos - c.start : end - c.start]
            pos = end
        return k, v

    def verify(self) -> None:
        """Read every chunk's stored bytes and check its checksum; raises :class:`ChecksumError` at the first bad
        one. Streams: memory is one piece of :data:`VERIFY_PIECE_BYTES`, nothing is decoded (the checksum covers
        the stored bytes), so a small coded file cannot make it allocate what its chunks decode to."""
        piece = np.empty(min(VERIFY_PIECE_BYTES, max(1, *(c.length for c in self.chunks))), dtype=np.uint8)
        for c in self.chunks:
            crc = 0
            for at in range(c.offset, c.offset + c.length, piece.nbytes):
                part = piece[: min(piece.nbytes, c.offset + c.length - at)]
                if not read_exact(self._fd, memoryview(part), at):
                    raise TruncatedFileError(f"chunk {c.index}: short read (the file shrank?)", path=self.path)
                crc = crc32c(part, crc)
            if crc != c.crc32c:
                raise ChecksumError(f"{_where(c)} checksum mismatch: the file is corrupted; re-publish or fetch it "
                                    "again", path=self.path)

    def fileno(self) -> int:
        """The descriptor of the file this reader validated. Read through it (or a ``dup`` of it), never by
        reopening the path, which could find another file put there since."""
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1  # forgotten before closing: a Ctrl-C in between must not close it twice
        if fd >= 0:
            os.close(fd)

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

