"""The native copy jobs (kvfast._C.LoadJob, kvfast._C_cuda.GpuLoadJob) behind a LoadHandle: plan, destinations,
and the binding boundary where native failures become kvfast's typed exceptions.

- host pages (``kvfast._C``): a small pool of C++ threads, GIL released, reads the chunks in file order in pieces
  of ``PIECE_BYTES`` and checksums each piece while it is in L2 (NHD pages are filled straight from the file's runs
  of tokens; HND and any other strides, D's included, through a per-thread staging buffer and a scatter). ``method`` picks how bytes
  come off the file: ``"preadv"``, ``"mmap"`` or ``"odirect"``; csrc/file_source.h says how each copies.
- CUDA pages (``kvfast._C_cuda``): the same workers read each chunk into a small ring of pinned staging slots,
  checksum it there, and hand it to a CUDA stream per worker: ``"scatter"`` copies the chunk to the device and
  scatters it with the paged-cache kernel; ``"dma"`` (NHD only) copies each run of tokens straight into its page.
  One CUDA event per layer (csrc/cuda/gpu_sink.h).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvfast._backend import native, native_cuda
from kvfast.cache.pages import KVPages
from kvfast.errors import ChecksumError, DeviceError, LoadCancelledError, TruncatedFileError
from kvfast.format import ChunkInfo, KvfReader

PIECE_BYTES = 256 << 10  # bytes per read + checksum step, small enough to be checksummed from L2
GPU_RING_SLOTS = 3  # pinned staging slots per worker: one being read, one in flight, one spare
# The C++ wait holds no GIL and cannot see Ctrl-C: waits are cut into slices this long so Python's signal
# handlers run between them (the latency of Ctrl-C during a load).
WAIT_SLICE_S = 0.05
_DESTS: weakref.WeakKeyDictionary[KVPages, list[tuple[np.ndarray, np.ndarray]]] = weakref.WeakKeyDictionary()


class NativeJob:
    """kvfast._C.LoadJob over host pages: the chunks of the first ``n`` tokens into blocks ``table``."""

    def __init__(self, reader: KvfReader, pages: KVPages, table: np.ndarray, n: int, verify: bool, threads: int,
                 method: str):
        self._plan = [c for c in reader.chunks if c.start < n]
        self._path = reader.path
        chunks = np.array([(c.index, c.layer, c.start, c.stop, c.offset, c.length, c.crc32c) for c in self._plan],
                          dtype=np.int64).reshape(-1, 7)
        # The descriptor kvfast.open validated (the job dups it): reopening the path could find another file.
        self._job = self._make(reader.fileno(), chunks, pages, table, n, verify, threads, method)

    @staticmethod
    def _make(fd: int, chunks: np.ndarray, pages: KVPages, table: np.ndarray, n: int, verify: bool, threads: int,
              method: str) -> Any:
        # An engine loads into the same pages on every request: their byte views are made once.
        dests = _DESTS.get(pages)
        if dests is None:
            dests = _DESTS[pages] = [(pages.byte_view(k), pages.byte_view(v))
                                     for k, v in zip(pages.keys, pages.values)]
        return native.LoadJob(fd, chunks, dests, table, n, method=method, threads=threads, verify=verify,
                              piece_bytes=PIECE_BYTES)

    def finished(self) -> bool:
        return self._job.finished()

    def failed(self) -> bool:
        return self._job.error() is not None

    def layer_ready(self, layer: int) -> bool:
        return self._job.layer_ready(layer)

    def wait_layer(self, layer: int, timeout: float | None) -> bool:
        return _sliced(lambda s: self._job.wait_layer(layer, s), timeout)

    def wait(self, timeout: float | None) -> bool:
        return _sliced(self._job.wait, timeout)

    def cancel(self) -> None:
        self._job.cancel()

    def release(self) -> None:
        """Drop the finished native job (its duplicate descriptor, mapping and buffers) now: a failed load's
        error and handle reference each other, so the garbage collector alone would hold them until a collection."""
        self._job = _Finished(self._job.error())

    def exception(self) -> BaseException | None:
        """The job's error as a kvfast exception naming the file and the chunk, in the words of
        :meth:`KvfReader.read_chunk`; None while it runs or after it succeeded."""
        error = self._job.error()
        if error is None:
            return None
        kind, pos, errno, offset, detail = error
        if pos < 0:  # a CUDA failure after every chunk was handed over (a wait or a query): no chunk to name
            return DeviceError(detail, path=self._path)
        c: ChunkInfo = self._plan[pos]
        where = f"chunk {c.index} (layer {c.layer}, tokens {c.start}:{c.stop})"
        if kind == "cancelled":
            return LoadCancelledError("the load was cancelled", path=self._path, chunk=c.index)
        if kind == "checksum":
            return ChecksumError(f"{where} checksum mismatch: the file is corrupted; re-publish or fetch it again",
                                 path=self._path, chunk=c.index)
        if kind == "truncated":
            return TruncatedFileError(f"{where}: {detail} at offset {offset} (the file shrank after it was "
                                      "opened?)", path=self._path, chunk=c.index)
        if kind == "device":
            return DeviceError(f"{where}: {detail}", path=self._path, chunk=c.index)
        error = OSError(errno, f"{where}: {detail}", str(self._path))
        error.chunk = c.index
        return error


def _sliced(wait: Callable[[float], bool], timeout: float | None) -> bool:
    """``wait(seconds)`` repeated in slices of at most :data:`WAIT_SLICE_S` until it returns True or ``timeout``
    (None: no limit) passed."""
    deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
    while True:
        left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))
        if wait(left):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False


class _Finished:
    """What is left of a released native job: its outcome, every wait over."""

    def __init__(self, error: tuple[Any, ...] | None):
        self._error = error

    def error(self) -> tuple[Any, ...] | None:
        return self._error

    def finished(self) -> bool:
        return True

    def layer_ready(self, layer: int) -> bool:
        return self._error is None

    def wait_layer(self, layer: int, timeout: float) -> bool:
        return True

    def wait(self, timeout: float) -> bool:
        return True

    def stream_wait_layer(self, layer: int, stream: int) -> bool:
        return self._error is None

    def cancel(self) -> None:
        pass


class GpuJob(NativeJob):
    """kvfast._C_cuda.GpuLoadJob: the native workers with pinned staging and CUDA streams (csrc/cuda/gpu_sink.h)."""

    @staticmethod
    def _make(fd: int, chunks: np.ndarray, pages: KVPages, table: np.ndarray, n: int, verify: bool, threads: int,
              method: str) -> Any:
        geometry, item = GpuJob.geometry(pages)
        # The load's writes start after the work the caller queued on these blocks (zeroing, copy on write).
        return native_cuda.GpuLoadJob(
            fd, chunks, [t.data_ptr() for t in pages.keys], [t.data_ptr() for t in pages.values], geometry, item,
            table, n, pages.device.index, stream=torch.cuda.current_stream(pages.device).cuda_stream, method=method,
            threads=threads, verify=verify, piece_bytes=PIECE_BYTES, ring_slots=GPU_RING_SLOTS)

    @staticmethod
    def geometry(pages: KVPages) -> tuple[tuple[int, ...], int]:
        """``(layout, itemsize)`` of the pages as ``GpuLoadJob`` takes them: ``(num_blocks, block_size, num_heads,
        head_bytes, block_stride, token_stride, head_stride)``, strides in bytes."""
        k0 = pages.token_major(pages.keys[0])
        item = k0.element_size()
        geometry = (*k0.shape[:3], k0.shape[3] * item, *(stride * item for stride in k0.stride()[:3]))
        if any(pages.token_major(t).stride() != k0.stride() for t in (*pages.keys, *pages.values)):
            raise ValueError("the native GPU loader needs every layer's K and V pages with one geometry")
        return geometry, item

    def stream_wait_layer(self, layer: int, stream: Any) -> bool:
        return self._job.stream_wait_layer(layer, stream.cuda_stream)
