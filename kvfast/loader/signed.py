"""A signed load (``trusted_keys``): the bytes checked against the signature are the bytes that landed in the pages.

Before the copy, :func:`kvfast.trust.signing.check_statement` checks the signature over everything but the chunk
bytes. The copy then runs once, and :class:`SignedJob` compares the Merkle root of what it loaded with the signed
one before the load counts as done: the reference job hashes each chunk's stored bytes as it reads them (before
decoding), and for the native jobs, which never hand their buffers to Python, the loaded tokens are gathered back
out of the pages and hashed. A file rewritten between a check and a second read can thus no longer slip unsigned
bytes in (issue 17): there is no second read. Chunks past a prefix load's ``num_tokens`` never land; their leaves
are read from the file.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
import torch

from kvfast._fs import read_exact
from kvfast.cache.pages import KVPages
from kvfast.errors import TruncatedFileError
from kvfast.format import ChunkInfo, KvfReader
from kvfast.loader.handle import CopyJob
from kvfast.trust.signing import SignedStatement


class SignedJob:
    """``job`` whose loaded bytes must have ``signed``'s Merkle root: finished, and its layers ready, only after
    the comparison; a mismatch is its error (:class:`SignatureError`), so the handle gives the blocks back.

    Args:
        leaves: the reference job's per-chunk SHA-256 of the stored bytes it read (filled as it runs), or None for
            a native job: then the loaded tokens are read back from ``pages`` at ``table``.
        close_reader: close ``reader`` once checked (the load opened it).
    """

    def __init__(self, job: CopyJob, reader: KvfReader, signed: SignedStatement, leaves: dict[int, bytes] | None,
                 pages: KVPages, table: np.ndarray, n: int, *, close_reader: bool):
        self._job, self._reader, self._signed, self._leaves = job, reader, signed, leaves
        self._pages, self._table, self._n, self._close_reader = pages, table, n, close_reader
        self._lock = threading.Lock()
        self._checked = False
        self._error: BaseException | None = None

    def _check(self) -> None:
        """Once the copy finished: compare the loaded bytes' Merkle root with the signed one."""
        with self._lock:
            if self._checked:
                return
            try:
                if self._job.exception() is None:
                    if self._pages.device.type == "cuda":  # the native GPU job's copies land on its own streams
                        torch.cuda.synchronize(self._pages.device)
                    self._signed.check_leaves([self._leaf(c) for c in self._reader.chunks])
            except BaseException as exc:  # noqa: BLE001 - the load's error, raised by wait()
                self._error = exc
            finally:
                self._checked = True
                if self._close_reader:
                    self._reader.close()

    def _leaf(self, chunk: ChunkInfo) -> bytes:
        if self._leaves is not None and chunk.index in self._leaves:
            return self._leaves[chunk.index]
        if chunk.start >= self._n:  # never loaded: its bytes went nowhere
            return hashlib.sha256(self._reader.read_stored(chunk, verify=False)).digest()
        return self._landed_leaf(chunk)

    def _landed_leaf(self, chunk: ChunkInfo) -> bytes:
        """SHA-256 of a raw chunk's stored bytes (K rows, then V rows) as they are in the pages, read a run of
        tokens within one block at a time (one slice, no gather); rows past ``n``, only checksummed, from the file."""
        pages, row = self._pages, self._reader.manifest.token_row_bytes
        bs, stop = pages.block_size, min(chunk.stop, self._n)
        digest = hashlib.sha256()
        for kv, layer_pages in enumerate((pages.keys[chunk.layer], pages.values[chunk.layer])):
            rows = pages.token_major(layer_pages).view(torch.uint8)  # [blocks, block_size, H, D * itemsize]
            t = chunk.start
            while t < stop:
                run = min(bs - t % bs, stop - t)
                piece = rows[int(self._table[t // bs]), t % bs : t % bs + run]
                digest.update(piece.contiguous().cpu().numpy())  # a view for host NHD pages
                t += run
            if stop < chunk.stop:
                at = chunk.offset + (kv * (chunk.stop - chunk.start) + stop - chunk.start) * row
                tail = bytearray((chunk.stop - stop) * row)
                if not read_exact(self._reader.fileno(), memoryview(tail), at):
                    raise TruncatedFileError(f"chunk {chunk.index}: short read (the file shrank?)",
                                             path=self._reader.path, chunk=chunk.index)
                digest.update(tail)
        return digest.digest()

    def finished(self) -> bool:
        if not self._job.finished():
            return False
        self._check()
        return True

    def failed(self) -> bool:
        return self._job.failed() or (self.finished() and self._error is not None)

    def layer_ready(self, layer: int) -> bool:
        return self.finished() and self.exception() is None

    def wait_layer(self, layer: int, timeout: float | None) -> bool:
        return self.wait(timeout)  # a layer is usable only once every chunk was compared

    def wait(self, timeout: float | None) -> bool:
        if not self._job.wait(timeout):
            return False
        self._check()
        return True

    def exception(self) -> BaseException | None:
        return self._job.exception() or self._error

    def stream_wait_layer(self, layer: int, stream: Any) -> bool:
        self.wait(None)
        return self.exception() is None and self._job.stream_wait_layer(layer, stream)

    def cancel(self) -> None:
        self._job.cancel()

    def release(self) -> None:
        self._job.release()
