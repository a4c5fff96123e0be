"""The reference copy job behind a LoadHandle: every native path is tested against it, bit for bit.

Each chunk is read into a staging buffer, checked, decoded when the file is coded (by the C++ decoder or the numpy
reference, on ``threads`` threads), and scattered with the pages' kernels (:mod:`kvfast.cache.ops` on the CPU). For
CUDA pages, a coded chunk's stored bytes go to the device and the Triton decoder (:mod:`kvfast.kernels.expcode`)
writes straight into the pages. Any device.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable

import numpy as np
import torch

from kvfast.cache.pages import KVPages
from kvfast.errors import CodecError, LoadCancelledError
from kvfast.format import ChunkInfo, KvfReader


def copy_chunks(reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool,
                on_layer: Callable[[int], None] | None = None, *, threads: int = 1, decoder: str = "auto",
                device_decode: bool | None = None, cancelled: threading.Event | None = None,
                leaves: dict[int, bytes] | None = None) -> None:
    """The first ``n`` tokens of every layer into ``slots`` (``[n]`` int64) of ``pages``; ``on_layer(l)`` after
    layer ``l`` (layers are stored layer-major, so they complete in order). Coded chunks are decoded on the host,
    or by the Triton decoder into the pages when ``device_decode`` (default: for CUDA pages; tests force it on CPU
    pages to run the kernel in Triton's interpreter). Raises :class:`LoadCancelledError` at the first chunk
    after ``cancelled`` is set. ``leaves`` (a signed load) receives each loaded chunk's SHA-256 of the stored
    bytes it read, by chunk index: the same bytes that are then decoded and written."""
    staging = np.empty(max(c.raw_length for c in reader.chunks), dtype=np.uint8)
    device_decode = pages.device.type == "cuda" if device_decode is None else device_decode
    for chunk in reader.chunks:
        if chunk.start >= n:
            continue
        if cancelled is not None and cancelled.is_set():
            raise LoadCancelledError("the load was cancelled", path=reader.path, chunk=chunk.index)
        stop = min(chunk.stop, n)
        t = stop - chunk.start
        if device_decode and chunk.length != chunk.raw_length:
            _decode_into_pages(reader, pages, chunk, slots[chunk.start : stop], verify, leaves)
        else:
            data = staging[: chunk.raw_length]
            if chunk.length == chunk.raw_length:  # raw, or stored verbatim (§7.1): read straight into staging
                stored = reader.read_stored(chunk, data, verify=verify)
            else:
                stored = reader.read_stored(chunk, verify=verify)
                reader.decode_stored(chunk, stored, data, threads=threads, backend=decoder)
            if leaves is not None:
                leaves[chunk.index] = hashlib.sha256(stored).digest()
            k, v = reader.split_chunk(chunk, data)
            pages.write(chunk.layer, slots[chunk.start : stop], k[:t].to(pages.device), v[:t].to(pages.device))
        if on_layer is not None and stop == n:
            on_layer(chunk.layer)


def _decode_into_pages(reader: KvfReader, pages: KVPages, chunk: ChunkInfo, slots: torch.Tensor,
                       verify: bool, leaves: dict[int, bytes] | None) -> None:
    """One coded chunk: stored bytes read and checked on the host, decoded on the pages' device into them."""
    from kvfast.format.codec import expcode
    from kvfast.kernels import expcode as expcode_kernels

    stored = reader.read_stored(chunk, verify=verify)
    if leaves is not None:
        leaves[chunk.index] = hashlib.sha256(stored).digest()
    slot_mapping = torch.full((chunk.stop - chunk.start,), -1, dtype=torch.int64)
    slot_mapping[: len(slots)] = slots.cpu()
    try:
        expcode_kernels.decode_paged(stored, pages.token_major(pages.keys[chunk.layer]),
                                     pages.token_major(pages.values[chunk.layer]), slot_mapping.to(pages.device),
                                     repeats=expcode.NAMES[reader.manifest.codec],
                                     where=f"chunk {chunk.index} (layer {chunk.layer}, tokens {chunk.start}:"
                                     f"{chunk.stop})")
    except CodecError as exc:
        raise CodecError(str(exc), path=reader.path, chunk=chunk.index) from None


class PythonJob:
    """:func:`copy_chunks` behind a LoadHandle: inline when ``blocking``, else on one background thread.

    On CUDA pages the writes are only enqueued when a layer is marked ready, so each layer also gets a CUDA event,
    recorded on the stream that wrote it: :meth:`stream_wait_layer` makes another stream wait on it, and the host
    waits (:meth:`wait_layer`, :meth:`wait`) until it landed. In the background the load writes on a stream of its
    own that first waits for the caller's current stream (work already queued on the blocks runs first).
    """

    def __init__(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool, *,
                 close_reader: bool, blocking: bool, threads: int = 1, decoder: str = "python",
                 leaves: dict[int, bytes] | None = None):
        self._ready = [False] * pages.num_layers
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._device = pages.device if pages.device.type == "cuda" else None
        self._events: list[torch.cuda.Event | None] = [None] * pages.num_layers
        self._stream: torch.cuda.Stream | None = None
        self._cancelled = threading.Event()
        if self._device is not None and not blocking:
            self._stream = torch.cuda.Stream(self._device)
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
            slots.record_stream(self._stream)  # made on the caller's stream, read on the load's
        args = (reader, pages, slots, n, verify, close_reader, threads, decoder, leaves)
        if blocking:
            self._run(*args)
        else:
            threading.Thread(target=self._run, args=args, name="kvfast-load", daemon=True).start()

    def _run(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool, close_reader: bool,
             threads: int, decoder: str, leaves: dict[int, bytes] | None) -> None:
        try:
            with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                self._copy_chunks(reader, pages, slots, n, verify, threads, decoder, leaves)
                if self._device is not None:  # finished means landed: done() and wait() promise the bytes
                    torch.cuda.current_stream(self._device).synchronize()
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self._error = exc
        finally:
            if close_reader:
                reader.close()
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _copy_chunks(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool,
                     threads: int, decoder: str, leaves: dict[int, bytes] | None) -> None:
        """The chunks of the first ``n`` tokens into the pages, calling :meth:`_layer_done` as layers complete."""
        copy_chunks(reader, pages, slots, n, verify, on_layer=self._layer_done, threads=threads, decoder=decoder,
                    cancelled=self._cancelled, leaves=leaves)

    def _layer_done(self, layer: int) -> None:
        event = None
        if self._device is not None:  # on the stream that enqueued the layer's writes
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._device))
        with self._cond:
            self._events[layer] = event
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
        ok, event = self._layer_event(layer, timeout)
        if event is not None:
            event.synchronize()
        return ok

    def stream_wait_layer(self, layer: int, stream: torch.cuda.Stream) -> bool:
        _, event = self._layer_event(layer, None)
        if event is None or self.failed():
            return False
        stream.wait_event(event)
        return True

    def _layer_event(self, layer: int, timeout: float | None) -> tuple[bool, torch.cuda.Event | None]:
        """Waits until the layer is enqueued or the job ended: (whether that happened, the layer's CUDA event)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._ready[layer] or self._finished, timeout)
            return ok, self._events[layer]

    def wait(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._finished, timeout)

    def exception(self) -> BaseException | None:
        return self._error

    def cancel(self) -> None:
        self._cancelled.set()

    def release(self) -> None:
        pass  # the reader was closed when the copy ended
