"""File -> staging -> paged cache: attach a .kvf document to a sequence of a :class:`PagedKVCache`.

Two paths, chosen in one place (:func:`_choose`):

- ``native`` (caches in host memory, when ``kvfast._C`` is built): a small pool of C++ threads, GIL released,
  reads the chunks in file order in pieces of ``PIECE_BYTES`` and checksums each piece while it is in L2 (NHD
  pages are filled straight from the file's runs of tokens; HND and other strides through a per-thread staging
  buffer and a scatter). ``method`` picks how bytes come off the file: ``"preadv"`` (the default, by
  measurement: bench/RESULTS.md), ``"mmap"`` or ``"odirect"``; csrc/file_source.h says how each copies.
- ``native`` (caches in GPU memory, when ``kvfast._C_cuda`` is built): the same C++ workers read each chunk
  into a small ring of pinned staging slots, checksum it there, and hand it to a CUDA stream per worker:
  ``method="scatter"`` (the default) copies the chunk to the device and scatters it with the paged-cache
  kernel; ``"dma"`` (NHD only) copies each run of tokens straight into its page. One CUDA event per layer
  (csrc/cuda/gpu_sink.h); :meth:`LoadHandle.stream_wait_layer` makes a stream wait for a layer.
- ``python``: the reference. pread into a staging buffer, checksum, scatter with :mod:`kvfast.ops`. Any device.
- coded files (``codec`` other than ``"raw"``, docs/FORMAT.md §7.1) take the reference path's loop with a decode
  step (``method="decode"``): each chunk's stored bytes are read and checked, then decoded into staging by the
  C++ decoder (``backend="native"``/``"auto"``, ``threads`` threads, GIL released) or the numpy reference
  (``"python"``) and scattered; for CUDA caches the stored bytes go to the device and the Triton decoder
  (:mod:`kvfast.kernels.expcode`) writes straight into the cache's pages. Raw files never take this path.

Every check that can refuse a file runs before the first block is allocated, and a failure while copying frees
what was allocated: a failed load leaves the cache as it was. :func:`load_async` returns a :class:`LoadHandle`
whose layers become ready in file order (layer-major), so attention over layer 0 can start early.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvfast._backend import native, native_cuda
from kvfast.errors import (
    CacheFullError,
    ChecksumError,
    DtypeMismatchError,
    InvalidArgumentError,
    ModelMismatchError,
    ShapeMismatchError,
    TokenMismatchError,
    TruncatedFileError,
)
from kvfast.fingerprint import fingerprint as model_fingerprint
from kvfast.fingerprint import model_config
from kvfast.format import DTYPE_NAMES, ChunkInfo, KvfReader, open_kvf
from kvfast.paged import KVSequence, PagedKVCache
from kvfast.sign import PublicKeyLike, verify_signature

BACKENDS = ("auto", "native", "python")
HOST_METHODS = ("preadv", "mmap", "odirect")  # how the native path reads into host pages
GPU_METHODS = ("scatter", "dma")  # how the native path moves pinned staging into device pages
METHODS = ("auto", *HOST_METHODS, *GPU_METHODS)
DEFAULT_METHOD = "preadv"  # what method="auto" runs for host caches; chosen by measurement (bench/RESULTS.md)
# For device caches: one large copy per chunk, then the scatter kernel (copy engines move ~55 GB/s on an H100
# where kernels reading host memory move ~35); "dma" (a copy per run of tokens) is measured beside it in
# bench/bench_load.py --device cuda. The choice is owed a GPU measurement.
DEFAULT_GPU_METHOD = "scatter"
GPU_RING_SLOTS = 3  # pinned staging slots per worker: one being read, one in flight, one spare
DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # copies are memory-bound: a few cores saturate memory
PIECE_BYTES = 256 << 10  # native: bytes per read + checksum step, small enough to be checksummed from L2


def load(
    path: str | os.PathLike | KvfReader,
    cache: PagedKVCache,
    *,
    model: Any | None = None,
    fingerprint: str | None = None,
    num_tokens: int | None = None,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    verify: bool = True,
    threads: int | None = None,
    backend: str = "auto",
    method: str = "auto",
    trusted_keys: Sequence[PublicKeyLike] | None = None,
) -> KVSequence:
    """Load a document's KV from a .kvf file into new blocks of ``cache`` and return its sequence.

    Args:
        path: the .kvf file (or an open :class:`KvfReader`).
        cache: the paged cache to fill; its layers, KV heads, head_dim and dtype must match the file.
        model: the model that will continue from this KV; its fingerprint must equal the file's.
        fingerprint: instead of ``model``, the expected fingerprint (one of the two is required).
        num_tokens: load only the first ``num_tokens`` tokens (a prefix); default all.
        token_ids: when given, the token ids the caller expects the loaded prefix to be; a difference raises
            :class:`TokenMismatchError` naming the first differing position.
        verify: check every chunk's checksum (turn off only for sources you trust).
        threads: worker threads of the native path (default ``min(4, cpu_count)``); the Python path uses one.
        backend: ``"auto"`` (native when built for the cache's device: ``kvfast._C`` for host memory,
            ``kvfast._C_cuda`` for CUDA; else Python),
            ``"native"`` or ``"python"`` to force one (tests, benchmarks).
        method: how the native path moves bytes: for host caches ``"auto"`` (= ``"preadv"``), ``"preadv"``,
            ``"mmap"`` or ``"odirect"``; for CUDA caches ``"auto"`` (= ``"scatter"``), ``"scatter"`` or
            ``"dma"``; only ``"auto"`` with ``backend="python"``.
        trusted_keys: Ed25519 public keys (:mod:`kvfast.sign`); when given, the file must carry a signature
            sidecar (``doc.kvf.sig``) by one of them over exactly its bytes, checked (every byte hashed) before
            the load through the same open file. For repeated loads, put the file into a
            ``Store(trusted_keys=...)``, which checks once on ingest.

    Returns:
        A new :class:`KVSequence` holding ``num_tokens`` tokens. Free it with ``cache.free(seq)``.

    Raises:
        FormatError (and subclasses): the file is invalid or corrupted (ChecksumError and TruncatedFileError
            name the chunk).
        ModelMismatchError, DtypeMismatchError, ShapeMismatchError: the file is for another model or cache.
        TokenMismatchError: ``token_ids`` differ from the file's.
        SignatureError: ``trusted_keys`` given and the file is unsigned, signed by another key, or altered.
        CacheFullError: not enough free blocks.
        OSError: the file could not be read (or ``method="odirect"`` on a filesystem without O_DIRECT).

    Example:
        >>> cache = kvfast.PagedKVCache.for_model(model, num_blocks=1024)  # doctest: +SKIP
        >>> seq = kvfast.load("doc.kvf", cache, model=model)                # doctest: +SKIP
    """
    if trusted_keys is None:
        return _start(path, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method,
                      blocking=True).wait()
    reader = path if isinstance(path, KvfReader) else open_kvf(path)
    try:
        verify_signature(reader, trusted_keys)
        return _start(reader, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method,
                      blocking=True).wait()
    finally:
        if reader is not path:
            reader.close()


def load_async(
    path: str | os.PathLike | KvfReader,
    cache: PagedKVCache,
    *,
    model: Any | None = None,
    fingerprint: str | None = None,
    num_tokens: int | None = None,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    verify: bool = True,
    threads: int | None = None,
    backend: str = "auto",
    method: str = "auto",
) -> LoadHandle:
    """Start loading a document like :func:`load` and return at once with a :class:`LoadHandle`.

    The checks (model, shape, dtype, tokens, free blocks) run before this returns and raise as in :func:`load`;
    reading and checksumming the chunks runs in the background. Layers complete in file order, so
    ``handle.wait_layer(0)`` returns long before the whole load is done. Call ``handle.wait()`` before using
    the sequence past the layers you waited for: it returns the sequence, or raises the load's error after
    freeing the sequence's blocks. Do not free the sequence or close a reader you passed while it runs.

    Example:
        >>> handle = kvfast.load_async("doc.kvf", cache, model=model)  # doctest: +SKIP
        >>> handle.wait_layer(0)                                       # doctest: +SKIP
        >>> ... attention over layer 0 of handle.sequence ...
        >>> seq = handle.wait()                                        # doctest: +SKIP
    """
    return _start(path, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method,
                  blocking=False)


class LoadHandle:
    """A load in progress (from :func:`load_async`).

    Attributes:
        sequence: the :class:`KVSequence` being filled; its blocks are allocated, its bytes arrive layer by layer.
        backend: ``"native"`` or ``"python"``.
        method: the native read method (``"preadv"``, ``"mmap"``, ``"odirect"``), ``"python"``, or ``"decode"`` for a
            coded file (its chunks decoded on the host, or by the Triton decoder for CUDA caches).
    """

    def __init__(self, sequence: KVSequence, job: _NativeJob | _PythonJob, cache: PagedKVCache, num_layers: int,
                 backend: str, method: str):
        self.sequence, self.backend, self.method = sequence, backend, method
        self._job, self._cache, self._num_layers = job, cache, num_layers
        self._lock = threading.Lock()
        self._settled = False
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the load has finished, successfully or not (``wait()`` then returns at once)."""
        return self._job.finished()

    def layer_ready(self, layer: int) -> bool:
        """Whether layer ``layer``'s K and V are all in the cache, checked. Raises the load's error once it failed."""
        self._check_layer(layer)
        if self._job.failed():
            self.wait()
        return self._job.layer_ready(layer)

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Block until layer ``layer`` is ready; raises the load's error if it failed, ``TimeoutError`` after
        ``timeout`` seconds."""
        self._check_layer(layer)
        if not self._job.wait_layer(layer, timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout} s")
        if self._job.failed():
            self.wait()

    def stream_wait_layer(self, layer: int, stream: Any | None = None) -> None:
        """Make ``stream`` (default: the current CUDA stream of the cache's device) wait until layer ``layer`` is
        in the cache, without blocking the host on the copy, so that layer's attention can be enqueued at once.

        The host waits only until the layer's chunks are read, checked and enqueued. For host caches and the
        Python path this is :meth:`wait_layer`. Raises the load's error if it failed.
        """
        self._check_layer(layer)
        if isinstance(self._job, _GpuJob):
            stream = torch.cuda.current_stream(self._cache.device) if stream is None else stream
            ok = self._job.stream_wait_layer(layer, stream)
        else:
            ok = self._job.wait_layer(layer, None) and not self._job.failed()
        if not ok:
            self.wait()

    def wait(self, timeout: float | None = None) -> KVSequence:
        """Block until the whole load is done and return the sequence.

        Raises the load's error (after freeing the sequence's blocks: the cache is as before the load), or
        ``TimeoutError`` after ``timeout`` seconds (the load goes on).
        """
        if not self._job.wait(timeout):
            raise TimeoutError(f"load not finished within {timeout} s")
        with self._lock:
            if not self._settled:
                self._settled = True
                self._error = self._job.exception()
                if self._error is not None:
                    self._cache.free(self.sequence)
        if self._error is not None:
            raise self._error
        return self.sequence

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self._num_layers})")

    def __repr__(self) -> str:
        state = "done" if self.done() else "loading"
        return f"LoadHandle(seq={self.sequence.seq_id}, {self.backend}/{self.method}, {state})"


def _start(path, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method, *,
           blocking: bool) -> LoadHandle:
    if model is None and fingerprint is None:
        raise InvalidArgumentError("kvfast.load needs model= or fingerprint= to check the file was made by that "
                                   "model", path=path.path if isinstance(path, KvfReader) else path)
    backend, method = _choose(backend, method, cache)
    threads = DEFAULT_THREADS if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 256:
        raise ValueError(f"threads must be an int in [1, 256], got {threads!r}")
    reader = path if isinstance(path, KvfReader) else open_kvf(path)
    owned = reader is not path
    try:
        n = _check(reader, cache, model, fingerprint, num_tokens, token_ids)
        seq = cache.new_sequence()
        try:
            slots = cache.append_slots(seq, n)
        except CacheFullError as e:
            cache.free(seq)
            raise CacheFullError(f"{reader.path}: cannot load {n} tokens: {e}") from None
    except BaseException:
        if owned:
            reader.close()
        raise
    try:
        if reader.manifest.codec != "raw":
            method = "decode"
            job = _PythonJob(reader, cache, slots, n, verify, close_reader=owned, blocking=blocking,
                             threads=threads, decoder="native" if backend == "native" else "python")
        elif backend == "native":
            kind = _GpuJob if cache.device.type == "cuda" else _NativeJob
            job: _NativeJob | _PythonJob = kind(reader, cache, seq, n, verify, threads, method)
            if owned:
                reader.close()  # the job reads through its own duplicate of the descriptor
        else:
            job = _PythonJob(reader, cache, slots, n, verify, close_reader=owned, blocking=blocking)
    except BaseException:
        cache.free(seq)
        if owned:
            reader.close()
        raise
    return LoadHandle(seq, job, cache, cache.num_layers, backend, method)


def _choose(backend: str, method: str, cache: PagedKVCache) -> tuple[str, str]:
    """(backend, method) to run: the one place the load path is decided."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend == "python" and method != "auto":
        raise ValueError(f"method={method!r} selects how the native path reads; backend='python' takes only 'auto'")
    kind = cache.device.type
    if backend == "native" and kind not in ("cpu", "cuda"):
        raise ValueError(f"the native loader fills caches in host or CUDA memory; this cache is on {cache.device} "
                         "(use backend='auto' or 'python')")
    built = native_cuda is not None and hasattr(native_cuda, "GpuLoadJob") if kind == "cuda" else native is not None
    if backend == "native" and not built:
        raise RuntimeError(f"backend='native' for a cache on {cache.device} needs the extension "
                           f"{'kvfast._C_cuda (built when nvcc is found)' if kind == 'cuda' else 'kvfast._C'}, "
                           "which is not built; reinstall with KVFAST_REQUIRE_NATIVE=1 to see why")
    allowed = GPU_METHODS if kind == "cuda" else HOST_METHODS
    if method != "auto" and method not in allowed:
        raise ValueError(f"method={method!r} is not for a cache on {cache.device}; use one of {allowed}")
    if backend == "native" or (backend == "auto" and built and kind in ("cpu", "cuda")):
        default = DEFAULT_GPU_METHOD if kind == "cuda" else DEFAULT_METHOD
        return "native", default if method == "auto" else method
    return "python", "python"


def _check(reader: KvfReader, cache: PagedKVCache, model: Any | None, fingerprint: str | None,
           num_tokens: int | None, token_ids: Sequence[int] | torch.Tensor | None) -> int:
    m, where = reader.manifest, reader.path
    if model is not None and model.dtype != m.dtype:
        raise DtypeMismatchError(f"KV is {DTYPE_NAMES[m.dtype]} but the model runs in {model.dtype}; publish "
                                 "the document with the model in the dtype you serve", path=where)
    if m.dtype != cache.dtype:
        raise DtypeMismatchError(f"KV is {DTYPE_NAMES[m.dtype]} but the paged cache is {cache.dtype}; create the "
                                 "cache with the file's dtype or re-publish in the model's dtype", path=where)
    ours = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
    theirs = (m.num_layers, m.num_kv_heads, m.head_dim)
    if ours != theirs:
        raise ShapeMismatchError(f"KV has (layers, kv_heads, head_dim) = {theirs}, the paged cache {ours}",
                                 path=where)
    expected = fingerprint if fingerprint is not None else model_fingerprint(model)
    if m.fingerprint != expected:
        raise ModelMismatchError(_mismatch_message(m.fingerprint, expected, m.config, model), path=where)
    n = m.num_tokens if num_tokens is None else num_tokens
    if not 1 <= n <= m.num_tokens:
        raise InvalidArgumentError(f"num_tokens={n} is not a prefix of the file's {m.num_tokens} tokens; "
                                   f"use 1..{m.num_tokens}", path=where)
    if token_ids is not None:
        want = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if want.numel() != n:
            raise TokenMismatchError(f"expected {want.numel()} token ids but loading {n} tokens", path=where)
        diff = (want != reader.token_ids[:n]).nonzero()
        if diff.numel():
            i = int(diff[0])
            raise TokenMismatchError(f"token ids differ at position {i}: file has {int(reader.token_ids[i])}, "
                                     f"caller expects {int(want[i])}", path=where)
    return n


def _mismatch_message(theirs: str, ours: str, config: Any, model: Any | None) -> str:
    msg = f"KV was made by model {theirs[:19]}..., not by this one ({ours[:19]}...)"
    if model is None:
        return msg
    mine = model_config(model)
    changed = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
    if changed:
        return f"{msg}; config fields that differ: {', '.join(changed)}"
    return f"{msg}; same config but other weights: publish the document again with this checkpoint"


def _copy(reader: KvfReader, cache: PagedKVCache, slots: torch.Tensor, n: int, verify: bool,
          on_layer: Callable[[int], None] | None = None, *, threads: int = 1, decoder: str = "auto",
          device_decode: bool | None = None) -> None:
    """The Python path: each chunk into a staging buffer, checked, (decoded,) then scattered; ``on_layer(l)`` after
    layer l. Coded chunks are decoded by ``decoder`` on ``threads`` threads, or, when ``device_decode`` (default:
    for CUDA caches), by the Triton decoder straight into the cache's pages."""
    staging = np.empty(max(c.raw_length for c in reader.chunks), dtype=np.uint8)
    device_decode = cache.device.type == "cuda" if device_decode is None else device_decode
    for chunk in reader.chunks:
        if chunk.start >= n:
            continue
        stop = min(chunk.stop, n)
        t = stop - chunk.start
        if device_decode and chunk.length != chunk.raw_length:
            _decode_into_cache(reader, cache, chunk, slots[chunk.start : stop], verify)
        else:
            data = reader.read_chunk(chunk, staging[: chunk.raw_length], verify=verify, threads=threads,
                                     backend=decoder)
            k, v = reader.split_chunk(chunk, data)
            cache.write(chunk.layer, slots[chunk.start : stop], k[:t].to(cache.device), v[:t].to(cache.device))
        if on_layer is not None and stop == n:
            on_layer(chunk.layer)  # the layer's last chunk in the load (layers are stored layer-major)


def _decode_into_cache(reader: KvfReader, cache: PagedKVCache, chunk: ChunkInfo, slots: torch.Tensor,
                       verify: bool) -> None:
    """One coded chunk: stored bytes read and checked on the host, decoded on the cache's device into its pages."""
    from kvfast.codec import CodecError, expcode
    from kvfast.kernels import expcode as expcode_kernels

    stored = reader.read_stored(chunk, verify=verify)
    slot_mapping = torch.full((chunk.stop - chunk.start,), -1, dtype=torch.int64)
    slot_mapping[: len(slots)] = slots.cpu()
    try:
        expcode_kernels.decode_paged(stored, _token_major(cache.key_cache(chunk.layer), cache.layout),
                                     _token_major(cache.value_cache(chunk.layer), cache.layout),
                                     slot_mapping.to(cache.device), repeats=expcode.NAMES[reader.manifest.codec],
                                     where=f"chunk {chunk.index} (layer "
                                     f"{chunk.layer}, tokens {chunk.start}:{chunk.stop})")
    except CodecError as exc:
        raise CodecError(str(exc), path=reader.path) from None


# -- the two kinds of job behind a LoadHandle ----------------------------------------------------------------
class _NativeJob:
    """kvfast._C.LoadJob over the cache's pages: the plan, the destinations and the error mapping."""

    def __init__(self, reader: KvfReader, cache: PagedKVCache, seq: KVSequence, n: int, verify: bool,
                 threads: int, method: str):
        self._plan = [c for c in reader.chunks if c.start < n]
        self._path = reader.path
        chunks = np.array([(c.index, c.layer, c.start, c.stop, c.offset, c.length, c.crc32c) for c in self._plan],
                          dtype=np.int64).reshape(-1, 7)
        table = np.asarray(seq.block_table, dtype=np.int64)
        # reader._fd: the descriptor kvfast.open validated; reopening the path could find another file
        self._job = self._make(reader._fd, chunks, cache, table, n, verify, threads, method)

    @staticmethod
    def _make(fd: int, chunks: np.ndarray, cache: PagedKVCache, table: np.ndarray, n: int, verify: bool,
              threads: int, method: str) -> Any:
        dests = [(_pages(cache.key_cache(layer), cache.layout), _pages(cache.value_cache(layer), cache.layout))
                 for layer in range(cache.num_layers)]
        return native.LoadJob(fd, chunks, dests, table, n, method=method, threads=threads, verify=verify,
                              piece_bytes=PIECE_BYTES)

    def finished(self) -> bool:
        return self._job.finished()

    def failed(self) -> bool:
        return self._job.error() is not None

    def layer_ready(self, layer: int) -> bool:
        return self._job.layer_ready(layer)

    def wait_layer(self, layer: int, timeout: float | None) -> bool:
        return self._job.wait_layer(layer, -1.0 if timeout is None else max(0.0, timeout))

    def wait(self, timeout: float | None) -> bool:
        return self._job.wait(-1.0 if timeout is None else max(0.0, timeout))

    def exception(self) -> BaseException | None:
        """The Python exception for the job's error, in the words of :meth:`KvfReader.read_chunk`."""
        error = self._job.error()
        if error is None:
            return None
        kind, pos, errno, offset, detail = error
        if kind == "cancelled":
            return RuntimeError("the load was cancelled")
        c: ChunkInfo = self._plan[pos]
        where = f"chunk {c.index} (layer {c.layer}, tokens {c.start}:{c.stop})"
        if kind == "checksum":
            return ChecksumError(f"{where} checksum mismatch: the file is corrupted; re-publish or fetch it again",
                                 path=self._path)
        if kind == "truncated":
            return TruncatedFileError(f"{where}: {detail} at offset {offset} (the file shrank after it was "
                                      "opened?)", path=self._path)
        if kind == "device":
            return RuntimeError(f"{self._path}: {where}: {detail}")
        return OSError(errno, f"{where}: {detail}", str(self._path))


class _GpuJob(_NativeJob):
    """kvfast._C_cuda.GpuLoadJob: the native workers with pinned staging and CUDA streams (csrc/cuda/gpu_sink.h)."""

    @staticmethod
    def _make(fd: int, chunks: np.ndarray, cache: PagedKVCache, table: np.ndarray, n: int, verify: bool,
              threads: int, method: str) -> Any:
        k0 = _token_major(cache.key_cache(0), cache.layout)
        item = k0.element_size()
        geometry = (*k0.shape[:3], k0.shape[3] * item, *(stride * item for stride in k0.stride()[:3]))
        for layer in range(cache.num_layers):
            for pages in (cache.key_cache(layer), cache.value_cache(layer)):
                if _token_major(pages, cache.layout).stride() != k0.stride():
                    raise ValueError("the native GPU loader needs every layer's K and V pages with one geometry")
        device = cache.device.index if cache.device.index is not None else torch.cuda.current_device()
        return native_cuda.GpuLoadJob(
            fd, chunks, [cache.key_cache(layer).data_ptr() for layer in range(cache.num_layers)],
            [cache.value_cache(layer).data_ptr() for layer in range(cache.num_layers)], geometry, item, table, n,
            device, method=method, threads=threads, verify=verify, piece_bytes=PIECE_BYTES,
            ring_slots=GPU_RING_SLOTS)

    def stream_wait_layer(self, layer: int, stream: Any) -> bool:
        return self._job.stream_wait_layer(layer, stream.cuda_stream)


def _token_major(pages: torch.Tensor, layout: str) -> torch.Tensor:
    """``pages`` as a ``[num_blocks, block_size, H, D]`` view (HND is ``[num_blocks, H, block_size, D]``)."""
    return pages.permute(0, 2, 1, 3) if layout == "HND" else pages


def _pages(pages: torch.Tensor, layout: str) -> np.ndarray:
    """One layer's K or V pages as the uint8 ``[num_blocks, block_size, H, head_dim * itemsize]`` array the native
    loader writes into (a strided view for HND); shares memory with the cache."""
    return _token_major(pages.view(torch.uint8), layout).numpy()  # last axis: head_dim * itemsize bytes


class _PythonJob:
    """The reference path behind a LoadHandle: inline when blocking, else on one background thread."""

    def __init__(self, reader: KvfReader, cache: PagedKVCache, slots: torch.Tensor, n: int, verify: bool, *,
                 close_reader: bool, blocking: bool, threads: int = 1, decoder: str = "python"):
        self._ready = [False] * cache.num_layers
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._decode = {"threads": threads, "decoder": decoder}
        args = (reader, cache, slots, n, verify, close_reader)
        if blocking:
            self._run(*args)
        else:
            threading.Thread(target=self._run, args=args, name="kvfast-load", daemon=True).start()

    def _run(self, reader, cache, slots, n, verify, close_reader) -> None:
        try:
            _copy(reader, cache, slots, n, verify, on_layer=self._layer_done, **self._decode)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc
        finally:
            if close_reader:
                reader.close()
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _layer_done(self, layer: int) -> None:
        with self._cond:
            self._ready[layer] = True
            self._cond.notify_all()

    def finished(self) -> bool:
        with self._cond:
            return self._finished

    def failed(self) -> bool:
        with self._cond:
            return self._error is not None

    def layer_ready(self, layer: int) -> bool:
        with self._cond:
            return self._ready[layer]

    def wait_layer(self, layer: int, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._ready[layer] or self._finished, timeout)

    def wait(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._finished, timeout)

    def exception(self) -> BaseException | None:
        return self._error
