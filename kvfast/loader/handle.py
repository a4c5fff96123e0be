"""A load in progress: per-layer readiness, CUDA stream ordering, and the one place a failed load gives back
what it was given (the blocks :func:`kvfast.load` allocated)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

from kvfast.cache.paged import KVSequence


class CopyJob(Protocol):
    """What runs a load: :class:`kvfast.loader.native.NativeJob`, ``GpuJob`` or :class:`kvfast.loader.reference.PythonJob`."""

    def finished(self) -> bool: ...
    def failed(self) -> bool: ...
    def layer_ready(self, layer: int) -> bool: ...
    def wait_layer(self, layer: int, timeout: float | None) -> bool: ...
    def wait(self, timeout: float | None) -> bool: ...
    def exception(self) -> BaseException | None: ...
    def stream_wait_layer(self, layer: int, stream: Any) -> bool: ...  # CUDA pages only
    def cancel(self) -> None: ...  # stop after the chunks in flight; exception() then says so
    def release(self) -> None: ...  # once finished and failed: close the file and drop buffers now, not at GC


def stop(job: CopyJob) -> None:
    """Cancel ``job`` and wait until its workers stopped, through further Ctrl-Cs: blocks must not be handed back
    while a worker may still write them (workers stop after the chunk they are on)."""
    job.cancel()
    while True:
        try:
            job.wait(None)
            return
        except KeyboardInterrupt:
            continue


class CompletedJob:
    """A copy that already happened (e.g. from a store's RAM tier): every layer ready, no error."""

    def finished(self) -> bool:
        return True

    def failed(self) -> bool:
        return False

    def layer_ready(self, layer: int) -> bool:
        return True

    def wait_layer(self, layer: int, timeout: float | None) -> bool:
        return True

    def wait(self, timeout: float | None) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def cancel(self) -> None:
        pass

    def release(self) -> None:
        pass


class LoadHandle:
    """A load in progress (from :func:`kvfast.load_async` or :func:`kvfast.load_into`).

    Attributes:
        sequence: the :class:`KVSequence` being filled (:func:`kvfast.load_async`), or None for a load into pages
            the caller owns (:func:`kvfast.load_into`).
        num_tokens: tokens being loaded (the first ``num_tokens`` of the document).
        backend: ``"native"`` or ``"python"``.
        method: the native read method (``"preadv"``, ``"mmap"``, ``"odirect"``, ``"scatter"``, ``"dma"``),
            ``"python"``, or ``"decode"`` for a coded file (its chunks decoded on the host, or by the Triton decoder
            for CUDA pages).
    """

    def __init__(self, job: CopyJob, *, num_layers: int, num_tokens: int, backend: str, method: str,
                 device: torch.device, sequence: KVSequence | None = None,
                 on_failure: Callable[[], None] | None = None):
        self.sequence, self.num_tokens, self.backend, self.method = sequence, num_tokens, backend, method
        self._job, self._num_layers, self._device, self._on_failure = job, num_layers, device, on_failure
        self._lock = threading.Lock()
        self._settled = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[BaseException | None], None]] = []

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """Call ``fn(error)`` once the load is settled by :meth:`wait` (``error`` None on success); at once if it
        already was."""
        with self._lock:
            if not self._settled:
                self._callbacks.append(fn)
                return
        fn(self._error)

    def done(self) -> bool:
        """Whether the load has finished, successfully or not (``wait()`` then returns at once)."""
        return self._job.finished()

    def layer_ready(self, layer: int) -> bool:
        """Whether layer ``layer``'s K and V are all in the pages, checked. Raises the load's error once it failed."""
        self._check_layer(layer)
        if self._job.failed():
            self.wait()
        ready = self._job.layer_ready(layer)
        if not ready and self._job.failed():  # the query itself failed (CUDA): raise it now
            self.wait()
        return ready

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Block until layer ``layer`` is ready; raises the load's error if it failed, ``TimeoutError`` after
        ``timeout`` seconds."""
        self._check_layer(layer)
        if not self._job.wait_layer(layer, timeout):
            raise TimeoutError(f"layer {layer} not loaded within {timeout} s")
        if self._job.failed():
            self.wait()

    def stream_wait_layer(self, layer: int, stream: Any | None = None) -> None:
        """Make ``stream`` (default: the current CUDA stream of the pages' device) wait until layer ``layer`` is
        in the pages, without blocking the host on the copy, so that layer's attention can be enqueued at once.

        The host waits only until the layer's chunks are read, checked and enqueued (for the reference path on CUDA
        pages: written by the load's stream), then ``stream`` waits on the layer's CUDA event. For host pages this
        is :meth:`wait_layer`. Raises the load's error if it failed.
        """
        self._check_layer(layer)
        if self._device.type == "cuda":
            stream = torch.cuda.current_stream(self._device) if stream is None else stream
            ok = self._job.stream_wait_layer(layer, stream)
        else:
            ok = self._job.wait_layer(layer, None) and not self._job.failed()
        if not ok:
            self.wait()

    def wait(self, timeout: float | None = None) -> KVSequence | None:
        """Block until the whole load is done and return :attr:`sequence`.

        Raises the load's error (after giving back what the load allocated: the cache is as before the load), or
        ``TimeoutError`` after ``timeout`` seconds (the load goes on). An exception raised while waiting, such as
        ``KeyboardInterrupt`` from Ctrl-C, cancels the load, waits for its workers to stop, gives back what it
        allocated, and propagates.
        """
        try:
            finished = self._job.wait(timeout)
            if finished:
                self._settle(self._job.exception())
        except BaseException as exc:  # Ctrl-C (or another signal handler's exception) while waiting or settling
            self.abandon(exc)
            raise
        if not finished:
            raise TimeoutError(f"load not finished within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.sequence

    def _settle(self, error: BaseException | None) -> None:
        """Record the outcome once: on failure give back the blocks and the job's file; then the callbacks."""
        with self._lock:
            if self._settled:
                return
            self._settled, self._error = True, error
            callbacks, self._callbacks = self._callbacks, []
        if error is not None:
            self._job.release()
            if self._on_failure is not None:
                self._on_failure()
        for fn in callbacks:
            fn(error)

    def abandon(self, exc: BaseException) -> None:
        """The caller stops waiting with ``exc``: cancel, wait until no worker can write a block any more, then
        settle as failed with ``exc``. A load that had already succeeded is given back too: the caller never
        receives its sequence. Calling it again changes nothing."""
        with self._lock:
            if self._settled and self._error is not None:  # failed or abandoned already: given back then
                return
        stop(self._job)
        with self._lock:
            succeeded = self._settled and self._error is None
            if succeeded:
                self._error = exc
        if succeeded:
            if self._on_failure is not None:
                self._on_failure()
        else:
            self._settle(exc)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self._num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self._num_layers})")

    def __repr__(self) -> str:
        state = "done" if self.done() else "loading"
        target = f"seq={self.sequence.seq_id}" if self.sequence is not None else "caller's pages"
        return f"LoadHandle({target}, {self.num_tokens} tokens, {self.backend}/{self.method}, {state})"
