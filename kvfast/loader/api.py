"""``load_into`` fills pages the caller owns; ``load`` and ``load_async`` allocate a sequence, then ``load_into``.

Every check that can refuse a file (kvfast.loader.compat, the block ids, a signature) runs before the first byte is
written, and a failure while copying gives back what the load allocated. The path is chosen in one place
(:func:`choose_path`): the native job when the extension is built, for host pages of any strides and for CUDA pages
whose rows of ``D`` elements are contiguous, else the reference; coded files (``codec`` other than ``"raw"``,
docs/FORMAT.md §7.1) take the reference job's loop with a decode step (``method="decode"``).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvfast._backend import native, native_cuda
from kvfast._fs import DEFAULT_THREADS
from kvfast.cache.pages import KVPages
from kvfast.cache.paged import KVSequence, PagedKVCache
from kvfast.errors import CacheFullError, InvalidArgumentError
from kvfast.format import KvfReader, open_kvf
from kvfast.loader.compat import check_file
from kvfast.loader.handle import CopyJob, LoadHandle, stop
from kvfast.loader.native import GpuJob, NativeJob
from kvfast.loader.reference import PythonJob
from kvfast.loader.signed import SignedJob
from kvfast.loader.stream import DEFAULT_STREAM_THREADS, RemoteReader, StreamJob, open_remote
from kvfast.origin import is_remote
from kvfast.trust.signing import PublicKeyLike, SignedStatement, check_statement

BACKENDS = ("auto", "native", "python")
HOST_METHODS = ("preadv", "mmap", "odirect")  # how the native path reads into host pages
GPU_METHODS = ("scatter", "dma")  # how the native path moves pinned staging into device pages
METHODS = ("auto", *HOST_METHODS, *GPU_METHODS)
DEFAULT_METHOD = "preadv"  # what method="auto" runs for host pages; chosen by measurement (bench/RESULTS.md)
# For device pages: one large copy per chunk, then the scatter kernel; "dma" (a copy per run of tokens) is measured
# beside it in bench/bench_load.py --device cuda. The choice is owed a GPU measurement.
DEFAULT_GPU_METHOD = "scatter"

Source = str | os.PathLike | KvfReader


def load(path: Source, cache: PagedKVCache, *, model: Any | None = None, fingerprint: str | None = None,
         num_tokens: int | None = None, token_ids: Sequence[int] | torch.Tensor | None = None, verify: bool = True,
         threads: int | None = None, backend: str = "auto", method: str = "auto",
         trusted_keys: Sequence[PublicKeyLike] | None = None) -> KVSequence:
    """Load a document's KV from a .kvf file into new blocks of ``cache`` and return its sequence.

    Args:
        path: the .kvf file (or an open :class:`KvfReader`), or a document at an origin: ``s3://bucket/key`` (the
            AWS environment variables give endpoint and credentials) or a presigned ``https://`` URL
            (:func:`kvfast.store.grant`), streamed by ranged GETs through a bounded ring (:mod:`kvfast.loader.stream`).
        cache: the paged cache to fill; its layers, KV heads, head_dim and dtype must match the file.
        model: the model that will continue from this KV; its fingerprint must equal the file's.
        fingerprint: instead of ``model``, the expected fingerprint (one of the two is required).
        num_tokens: load only the first ``num_tokens`` tokens (a prefix); default all.
        token_ids: when given, the token ids the caller expects the loaded prefix to be; a difference raises
            :class:`TokenMismatchError` naming the first differing position.
        verify: check every chunk's checksum (turn off only for sources you trust).
        threads: worker threads of the native path (default ``min(4, cpu_count)``); the Python path uses one.
        backend: ``"auto"`` (native when built for the cache's device: ``kvfast._C`` for host memory,
            ``kvfast._C_cuda`` for CUDA; else Python), ``"native"`` or ``"python"`` to force one (tests, benchmarks).
        method: how the native path moves bytes: for host caches ``"auto"`` (= ``"preadv"``), ``"preadv"``,
            ``"mmap"`` or ``"odirect"``; for CUDA caches ``"auto"`` (= ``"scatter"``), ``"scatter"`` or
            ``"dma"``; only ``"auto"`` with ``backend="python"``.
        trusted_keys: Ed25519 public keys (:mod:`kvfast.trust.signing`); when given, the file must carry a signature
            sidecar (``doc.kvf.sig``) by one of them over exactly its bytes: the signed statement is checked
            before the load, and the chunks are hashed as they are loaded (or read back from the pages they
            landed in) and their Merkle root compared with the signed one before the sequence is returned, so
            a file rewritten during the load cannot slip in unsigned bytes. For repeated loads, put the file into
            a ``Store(trusted_keys=...)``, which checks once on ingest.

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
        OriginError: a remote document's origin is unreachable, refused the request or broke off (an OSError).

    Example:
        >>> cache = kvfast.PagedKVCache.for_model(model, num_blocks=1024)  # doctest: +SKIP
        >>> seq = kvfast.load("doc.kvf", cache, model=model)                # doctest: +SKIP
    """
    handle = _load(path, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method,
                   trusted_keys, blocking=True)
    try:  # Ctrl-C can land on entering wait(), before its own handler: the blocks are given back here then
        return handle.wait()
    except BaseException as exc:
        handle.abandon(exc)
        raise


def load_async(path: Source, cache: PagedKVCache, *, model: Any | None = None, fingerprint: str | None = None,
               num_tokens: int | None = None, token_ids: Sequence[int] | torch.Tensor | None = None,
               verify: bool = True, threads: int | None = None, backend: str = "auto",
               method: str = "auto") -> LoadHandle:
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
    return _load(path, cache, model, fingerprint, num_tokens, token_ids, verify, threads, backend, method, None,
                 blocking=False)


def load_into(source: Source, pages: KVPages | PagedKVCache, block_ids: Sequence[int] | np.ndarray | torch.Tensor,
              *, model: Any | None = None, fingerprint: str | None = None, num_tokens: int | None = None,
              token_ids: Sequence[int] | torch.Tensor | None = None, verify: bool = True, threads: int | None = None,
              backend: str = "auto", method: str = "auto", trusted_keys: Sequence[PublicKeyLike] | None = None,
              blocking: bool = True) -> LoadHandle:
    """Load a document's KV into pages the caller owns, at the blocks it names; allocates nothing.

    The call a serving engine makes with its own block ids: token ``p`` lands in block
    ``block_ids[p // block_size]`` at offset ``p % block_size``. It runs the same checks and the same native
    or reference job as :func:`load` (which is: allocate a sequence, then this), and writes nothing before
    every check passed. A failure while copying leaves the named blocks holding partial data (they are the
    caller's to recompute); no other block is ever written.

    Args:
        source: the .kvf file (or an open :class:`KvfReader`).
        pages: the destination (:class:`KVPages`: per-layer K and V page tensors, NHD or HND, any strides), or a
            :class:`PagedKVCache` (its pages; its allocator is not consulted: name blocks you hold).
        block_ids: the blocks to fill, in token order; at least ``ceil(num_tokens / block_size)`` of them, each
            in ``[0, num_blocks)`` and none twice.
        blocking: wait for the copy (default); with False return once the checks passed and the copy runs in
            the background (``handle.wait_layer(l)``, ``handle.wait()``).
        model, fingerprint, num_tokens, token_ids, verify, threads, backend, method, trusted_keys: as in
            :func:`load`.

    Returns:
        A :class:`LoadHandle` (finished when ``blocking``) whose ``num_tokens`` says how many tokens landed.

    Raises:
        PagesError: too few block ids, one out of range, or one named twice (before anything is written).
        Everything :func:`load` raises, except CacheFullError.

    Example:
        >>> keys = [torch.zeros(64, 16, 2, 64, dtype=torch.bfloat16) for _ in range(24)]   # doctest: +SKIP
        >>> values = [torch.zeros_like(k) for k in keys]                                   # doctest: +SKIP
        >>> pages = kvfast.KVPages(keys, values, layout="NHD")                             # doctest: +SKIP
        >>> kvfast.load_into("doc.kvf", pages, [7, 3, 12], fingerprint=fp).num_tokens      # doctest: +SKIP
        40
    """
    pages = pages.pages if isinstance(pages, PagedKVCache) else pages
    reader, owned, n, signed = _open_checked(source, pages, model, fingerprint, num_tokens, token_ids, trusted_keys)
    try:
        table = pages.check_block_ids(block_ids, n)
    except BaseException:
        if owned:
            reader.close()
        raise
    handle = _run(reader, owned, pages, table, n, verify, threads, backend, method, blocking=blocking, signed=signed)
    if blocking:
        handle.wait()  # raises the load's error
    return handle


def _load(path: Source, cache: PagedKVCache, model: Any | None, fingerprint: str | None, num_tokens: int | None,
          token_ids: Sequence[int] | torch.Tensor | None, verify: bool, threads: int | None, backend: str,
          method: str, trusted_keys: Sequence[PublicKeyLike] | None, *, blocking: bool) -> LoadHandle:
    """Allocate a sequence for the checked prefix, then :func:`_run` into its blocks; the blocks are freed if the
    load fails."""
    reader, owned, n, signed = _open_checked(path, cache.pages, model, fingerprint, num_tokens, token_ids,
                                             trusted_keys)
    seq = cache.new_sequence()
    try:
        cache.append_slots(seq, n)
        table = np.asarray(seq.block_table, dtype=np.int64)
        # Inside the try: Ctrl-C can land on entering _run, before its own handler (which also frees: a no-op
        # the second time, and it closes the reader then).
        return _run(reader, owned, cache.pages, table, n, verify, threads, backend, method, blocking=blocking,
                    signed=signed, sequence=seq, on_failure=lambda: cache.free(seq))
    except BaseException as e:  # CacheFullError, or Ctrl-C once blocks may be taken
        cache.free(seq)
        if owned:
            reader.close()
        if isinstance(e, CacheFullError):
            raise CacheFullError(f"cannot load {n} tokens: {e}", path=reader.path) from None
        raise


def _open_checked(source: Source, pages: KVPages, model: Any | None, fingerprint: str | None,
                  num_tokens: int | None, token_ids: Sequence[int] | torch.Tensor | None,
                  trusted_keys: Sequence[PublicKeyLike] | None
                  ) -> tuple[KvfReader, bool, int, SignedStatement | None]:
    """The reader (and whether this load owns it), the number of tokens to load, and the checked signature whose
    Merkle root the loaded chunks must have (``trusted_keys`` given), after every check."""
    if model is None and fingerprint is None:
        where = source.path if isinstance(source, KvfReader) else os.fspath(source)
        raise InvalidArgumentError("kvfast.load needs model= or fingerprint= to check the file was made by that model",
                                   path=where)
    if trusted_keys is not None and is_remote(source):
        raise InvalidArgumentError("trusted_keys with a remote document: load it through a kvfast.Store(root, "
                                   "origin=..., trusted_keys=...), which verifies the fetched copy",
                                   path=str(source).split("?")[0])
    reader = source if isinstance(source, KvfReader) else open_remote(source) if is_remote(source) else \
        open_kvf(source)
    owned = reader is not source
    try:
        signed = None if trusted_keys is None else check_statement(reader, trusted_keys)
        n = check_file(reader, pages.kv_shape, pages.dtype, model=model, fingerprint=fingerprint,
                       num_tokens=num_tokens, token_ids=token_ids)
    except BaseException:
        if owned:
            reader.close()
        raise
    return reader, owned, n, signed


def _run(reader: KvfReader, owned: bool, pages: KVPages, table: np.ndarray, n: int, verify: bool,
         threads: int | None, backend: str, method: str, *, blocking: bool, signed: SignedStatement | None = None,
         sequence: KVSequence | None = None, on_failure: Callable[[], None] | None = None) -> LoadHandle:
    """Start the job that copies the first ``n`` tokens into blocks ``table`` of ``pages`` (its loaded bytes
    compared with ``signed``'s Merkle root when given)."""
    job: CopyJob | None = None
    leaves: dict[int, bytes] | None = None if signed is None else {}
    close_reader = owned and signed is None  # a signed load's check reads the chunks that were not loaded
    try:
        backend, method = choose_path(pages, backend, method)
        if threads is None:
            threads = DEFAULT_STREAM_THREADS if isinstance(reader, RemoteReader) else DEFAULT_THREADS
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 256:
            raise ValueError(f"threads must be an int in [1, 256], got {threads!r}")
        if isinstance(reader, RemoteReader):  # an origin: ranged GETs into a ring, checked, scattered in order
            backend, method = "python", "stream"
            job = StreamJob(reader, pages, table, n, verify, close_reader=owned,
                            blocking=blocking, threads=threads, decoder="native" if native is not None else "python")
        elif reader.manifest.codec != "raw":
            method = "decode"
            job = PythonJob(reader, pages, pages.slot_mapping(table, 0, n), n, verify, close_reader=close_reader,
                            blocking=blocking, threads=threads, decoder="native" if backend == "native" else "python",
                            leaves=leaves)
        elif backend == "native":
            job = (GpuJob if pages.device.type == "cuda" else NativeJob)(reader, pages, table, n, verify, threads,
                                                                          method)
            leaves = None  # the native job's buffers stay in C++: SignedJob hashes the loaded pages
            if close_reader:
                reader.close()  # the job reads through its own duplicate of the descriptor
        else:
            job = PythonJob(reader, pages, pages.slot_mapping(table, 0, n), n, verify, close_reader=close_reader,
                            blocking=blocking, leaves=leaves)
        if signed is not None:
            job = SignedJob(job, reader, signed, leaves, pages, table, n, close_reader=owned)
        return LoadHandle(job, num_layers=pages.num_layers, num_tokens=n, backend=backend, method=method,
                          device=pages.device, sequence=sequence, on_failure=on_failure)
    except BaseException:  # an error, or Ctrl-C before the handle that would give back the blocks exists
        if job is not None:
            stop(job)
        if on_failure is not None:
            on_failure()
        if owned:
            reader.close()
        raise


def choose_path(pages: KVPages, backend: str = "auto", method: str = "auto") -> tuple[str, str]:
    """The ``(backend, method)`` a load into ``pages`` runs: the one place the load path is decided (a serving
    engine logs it once, when it registers its pages).

    Raises:
        ValueError: ``backend`` or ``method`` unknown, or not possible for these pages.
        RuntimeError: ``backend="native"`` and the extension for the pages' device is not built.

    Example:
        >>> pages = KVPages([torch.zeros(4, 2, 16, 8).transpose(2, 3)], [torch.zeros(4, 2, 16, 8)], layout="HND")
        >>> choose_path(pages)  # doctest: +SKIP
        ('native', 'preadv')
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend == "python" and method != "auto":
        raise ValueError(f"method={method!r} selects how the native path reads; backend='python' takes only 'auto'")
    kind = pages.device.type
    if backend == "native" and kind not in ("cpu", "cuda"):
        raise ValueError(f"the native loader fills pages in host or CUDA memory; these are on {pages.device} "
                         "(use backend='auto' or 'python')")
    built = native_cuda is not None and hasattr(native_cuda, "GpuLoadJob") if kind == "cuda" else native is not None
    if backend == "native" and not built:
        raise RuntimeError(f"backend='native' for pages on {pages.device} needs the extension "
                           f"{'kvfast._C_cuda (built when nvcc is found)' if kind == 'cuda' else 'kvfast._C'}, "
                           "which is not built; reinstall with KVFAST_REQUIRE_NATIVE=1 to see why")
    # The host job scatters any strides; the GPU sinks copy rows of head_dim contiguous elements.
    strides_ok = kind == "cpu" or pages.rows_contiguous()
    if backend == "native" and not strides_ok:
        raise ValueError("backend='native' for CUDA pages copies rows of head_dim contiguous elements; these pages "
                         "store head_dim with a stride (use backend='auto' or 'python')")
    allowed = GPU_METHODS if kind == "cuda" else HOST_METHODS
    if method != "auto" and method not in allowed:
        raise ValueError(f"method={method!r} is not for pages on {pages.device}; use one of {allowed}")
    native_ok = built and kind in ("cpu", "cuda") and strides_ok
    if backend == "native" or (backend == "auto" and native_ok):
        default = DEFAULT_GPU_METHOD if kind == "cuda" else DEFAULT_METHOD
        return "native", default if method == "auto" else method
    return "python", "python"
