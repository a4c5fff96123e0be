"""Loading from an origin: a .kvf object read by parallel ranged GETs into a bounded ring of staging buffers, every
chunk checked against its CRC-32C before a byte of it reaches a page or a local file, in file order
(layer-major), so layer 0 is in the pages long before the whole document has arrived.

    origin ──ranged GETs (threads)──▶ ring slot i % R ──CRC per chunk──▶ pages.write / file    (in file order)

Memory is the ring (``R`` slots of at most ``PIECE_BYTES``), never the object. The header (preamble, manifest,
token ids) is fetched first and validated by :class:`kvfast.format.KvfReader`'s own checks: it sits in an anonymous
memory file sized like the object (sparse, so the chunks' range costs nothing), and chunk reads go to the origin.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kvfast._backend import crc32c
from kvfast.cache.pages import KVPages
from kvfast.errors import ChecksumError, LoadCancelledError, ManifestError
from kvfast.format import ChunkInfo, KvfReader
from kvfast.format.spec import MAX_MANIFEST_BYTES, PREAMBLE
from kvfast.loader.reference import PythonJob
from kvfast.origin import OriginConfig, RangeSource, open_source

PIECE_BYTES = 8 << 20  # one ranged GET: large enough that request overhead is small, small enough to pipeline
RING_SLOTS_PER_THREAD = 2  # one being fetched, one being checked and scattered
DEFAULT_STREAM_THREADS = 4  # parallel GETs; measured in bench/bench_origin.py
_HEAD_GUESS = 64 << 10  # first GET: the preamble and a typical manifest in one round trip


class RemoteReader(KvfReader):
    """A validated .kvf object at an origin: manifest, chunks and token ids as :class:`KvfReader` has them; chunk
    reads are ranged GETs. Use :func:`open_remote`.

    Attributes:
        source: the object (:class:`kvfast.origin.RangeSource`).
        path: its URL (without a presigned link's signature), for messages.
    """

    def __init__(self, source: RangeSource):
        self.source, self.path = source, source.url
        self._file_size = source.size
        self._fd = _memfd()
        try:
            os.ftruncate(self._fd, self._file_size)
            head = self._fetch(0, min(self._file_size, _HEAD_GUESS))
            if len(head) >= PREAMBLE.size:
                manifest_len = PREAMBLE.unpack(head[: PREAMBLE.size])[2]
                end = PREAMBLE.size + min(manifest_len, MAX_MANIFEST_BYTES)
                if end > len(head) and end <= self._file_size:
                    head = self._fetch(0, end)
            os.pwrite(self._fd, head, 0)
            self.manifest, self.chunks, self.data_start, tokens = self._parse()
            if tokens["length"] > self.chunks[0].offset - self.data_start:
                raise ManifestError("token ids overlap the first chunk", path=self.path)
            os.pwrite(self._fd, self._fetch(self.data_start, tokens["length"]), self.data_start)
            self.token_ids = self._read_token_ids(tokens)
        except BaseException:
            self.close()
            raise

    def _fetch(self, start: int, length: int) -> bytes:
        out = np.empty(length, dtype=np.uint8)
        if length:
            self.source.read_into(start, out)
        return out.tobytes()

    def head_bytes(self) -> bytes:
        """The validated bytes before the first chunk (preamble, manifest, token ids; padding as zeros)."""
        return os.pread(self._fd, self.chunks[0].offset, 0)

    def read_stored(self, chunk: ChunkInfo, out: np.ndarray | None = None, *, verify: bool = True) -> np.ndarray:
        if out is None:
            out = np.empty(chunk.length, dtype=np.uint8)
        self.source.read_into(chunk.offset, out)
        if verify and crc32c(out) != chunk.crc32c:
            raise _checksum_error(self, chunk)
        return out

    def fileno(self) -> int:
        raise OSError(f"{self.path} is at an origin, not in a local file; it streams through kvfast.loader.stream")


def open_remote(url: str, config: OriginConfig | None = None) -> RemoteReader:
    """Open and validate a .kvf object at ``s3://bucket/key`` or a presigned ``https://`` URL.

    Raises:
        OriginError: the origin is unreachable, refuses the request, or has no such object.
        FormatError (and subclasses): the object is not a valid .kvf file.
    """
    return RemoteReader(open_source(url, config))


@dataclass(frozen=True)
class Piece:
    """Consecutive chunks fetched by one ranged GET: bytes ``[start, stop)`` of the object."""

    start: int
    stop: int
    chunks: tuple[ChunkInfo, ...]


def plan_pieces(chunks: list[ChunkInfo], piece_bytes: int | None = None) -> list[Piece]:
    """Group chunks (in file order) into ranged GETs of at most ``piece_bytes`` (default ``PIECE_BYTES``; a larger
    chunk goes alone)."""
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    pieces: list[Piece] = []
    group: list[ChunkInfo] = []
    for c in chunks:
        if group and c.offset + c.length - group[0].offset > piece_bytes:
            pieces.append(Piece(group[0].offset, group[-1].offset + group[-1].length, tuple(group)))
            group = []
        group.append(c)
    if group:
        pieces.append(Piece(group[0].offset, group[-1].offset + group[-1].length, tuple(group)))
    return pieces


def stream_chunks(reader: RemoteReader, chunks: list[ChunkInfo], *, threads: int = DEFAULT_STREAM_THREADS,
                  verify: bool = True) -> Iterator[tuple[Piece, np.ndarray, list[tuple[ChunkInfo, np.ndarray]]]]:
    """Fetch ``chunks`` by parallel ranged GETs into a ring of ``threads * RING_SLOTS_PER_THREAD`` staging slots and
    yield, in file order, ``(piece, its bytes, [(chunk, its stored bytes)])`` once every chunk of the piece passed
    its checksum. A slot is reused as soon as the consumer asks for the next piece: copy out what you keep.

    Raises:
        ChecksumError: a chunk's bytes differ from its CRC-32C (nothing of that piece is yielded).
        OriginError: a GET failed.
    """
    pieces = plan_pieces(chunks)
    if not pieces:
        return
    nslots = min(len(pieces), threads * RING_SLOTS_PER_THREAD)
    size = max(p.stop - p.start for p in pieces)
    pinned = torch.cuda.is_available()  # pinned staging lets a CUDA copy run asynchronously from it
    ring = [torch.empty(size, dtype=torch.uint8, pin_memory=pinned).numpy() for _ in range(nslots)]
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kvfast-get")
    inflight: dict[int, Future] = {}

    def submit(i: int) -> None:
        p = pieces[i]
        inflight[i] = pool.submit(reader.source.read_into, p.start, ring[i % nslots][: p.stop - p.start])

    try:
        for i in range(nslots):
            submit(i)
        for i, p in enumerate(pieces):
            inflight.pop(i).result()
            buf = ring[i % nslots][: p.stop - p.start]
            parts = []
            for c in p.chunks:
                data = buf[c.offset - p.start : c.offset - p.start + c.length]
                if verify and crc32c(data) != c.crc32c:
                    raise _checksum_error(reader, c)
                parts.append((c, data))
            yield p, buf, parts
            if i + nslots < len(pieces):
                submit(i + nslots)
    finally:
        for f in inflight.values():
            f.cancel()
        pool.shutdown(wait=True)  # no GET writes into a slot after this returns


class StreamJob(PythonJob):
    """A load from an origin behind a :class:`LoadHandle`: :func:`stream_chunks` scattered into the pages on one
    background thread (inline when ``blocking``); layer ``l`` is ready once its last needed chunk landed.

    ``table`` (``[>= ceil(n / block_size)]`` int64): the destination blocks, token ``p`` into ``table[p // bs]``.
    """

    def __init__(self, reader: KvfReader, pages: KVPages, table: np.ndarray, n: int, verify: bool, *,
                 close_reader: bool, blocking: bool, threads: int, decoder: str):
        self._table = np.asarray(table, dtype=np.int64)
        super().__init__(reader, pages, pages.slot_mapping(table, 0, n), n, verify, close_reader=close_reader,
                         blocking=blocking, threads=threads, decoder=decoder)

    def _write(self, pages: KVPages, layer: int, slots: torch.Tensor, start: int, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Tokens ``[start, start + len(k))`` of one layer: whole blocks in one indexed copy per K and V (a chunk
        starts on a block boundary whenever the block size divides the chunk's tokens, docs/FORMAT.md §6), the
        rest token by token."""
        bs, t = pages.block_size, len(k)
        full = t // bs if start % bs == 0 else 0
        if full:
            ids = self._table[start // bs : start // bs + full]
            for src, dst in ((k, pages.keys[layer]), (v, pages.values[layer])):
                blocks = src[: full * bs].reshape(full, bs, *src.shape[1:])  # [full, bs, H, D]
                blocks = blocks if pages.layout == "NHD" else blocks.transpose(1, 2)  # HND: [full, H, bs, D]
                for a, b in _runs(ids):  # consecutive block ids: one plain copy each (an engine's are mostly so)
                    _copy(dst[ids[a] : ids[a] + b - a], blocks[a:b])
        if full * bs < t:
            rest = slice(full * bs, t)
            pages.write(layer, slots[start + full * bs : start + t], k[rest].to(pages.device),
                        v[rest].to(pages.device))

    def _copy_chunks(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool,
                     threads: int, decoder: str, leaves: dict[int, bytes] | None) -> None:
        """:func:`stream_chunks` into the pages, in file order; a layer is ready once its last needed chunk
        landed."""
        assert leaves is None  # a signed load of a remote document is refused before a job starts (api.py)
        plan = [c for c in reader.chunks if c.start < n]
        for _, _, parts in stream_chunks(reader, plan, threads=threads, verify=verify):
            if self._cancelled.is_set():
                raise LoadCancelledError("the load was cancelled", path=reader.path, chunk=parts[0][0].index)
            for c, stored in parts:
                stop = min(c.stop, n)
                if c.length == c.raw_length:
                    data = stored
                else:  # coded (docs/FORMAT.md §7.1): decoded on the host from the checked bytes
                    data = _decode(reader, c, stored, threads, decoder)
                k, v = reader.split_chunk(c, data)
                t = stop - c.start
                self._write(pages, c.layer, slots, c.start, k[:t], v[:t])
                if stop == n:
                    self._layer_done(c.layer)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``. Into host memory as one single-threaded copy (numpy's, without the GIL): torch's copy
    spreads a large one over its intra-op threads, which spin against the GET threads (and on a small machine the
    origin itself) at every chunk; bench/RESULTS.md has the measurement. Into a device: torch's asynchronous copy."""
    if dst.device.type != "cpu":
        dst.copy_(src, non_blocking=True)
        return
    np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` index ranges of ``ids`` whose values are consecutive integers."""
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    bounds = [0, *cuts.tolist(), len(ids)]
    return list(itertools.pairwise(bounds))


def _decode(reader: KvfReader, c: ChunkInfo, stored: np.ndarray, threads: int, decoder: str) -> np.ndarray:
    from kvfast.format import codec as codecs

    m = reader.manifest
    out = np.empty(c.raw_length, dtype=np.uint8)
    return codecs.decode_chunk(m.codec, stored, out, c.stop - c.start, m.num_kv_heads, m.head_dim, m.dtype.itemsize,
                               where=f"chunk {c.index}", backend=decoder, threads=threads)


def fetch_to_file(reader: RemoteReader, path: str | os.PathLike, *, threads: int = DEFAULT_STREAM_THREADS) -> None:
    """Copy the object into a new local file ``path``, every chunk checked before it is written (the caller
    fsyncs and commits the file; on an error it holds no unchecked byte, and the caller removes it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, reader.source.size)  # padding between chunks stays zero, as docs/FORMAT.md §2 asks
        os.pwrite(fd, reader.head_bytes(), 0)
        for _, _, parts in stream_chunks(reader, reader.chunks, threads=threads, verify=True):
            for c, data in parts:  # only checked bytes are written
                view, done = memoryview(data), 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], c.offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def _checksum_error(reader: KvfReader, c: ChunkInfo) -> ChecksumError:
    return ChecksumError(f"chunk {c.index} (layer {c.layer}, tokens {c.start}:{c.stop}) checksum mismatch: the "
                         "object at the origin is corrupted; re-publish it", path=reader.path, chunk=c.index)


def _memfd() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return os.memfd_create("kvfast-remote-head", os.MFD_CLOEXEC)
    fd, name = tempfile.mkstemp(prefix="kvfast-remote-head-")
    os.unlink(name)
    return fd
