"""The reference copy job behind a LoadHandle: every native path is tested against it, bit for bit.

Each chunk is read into a staging buffer, checked, decoded when the file is coded (by the C++ decoder or the numpy
reference, on ``threads`` threads), and scattered with the pages' kernels (:mod:`kvfast.cache.ops` on the CPU). For
CUDA pages, a coded chunk's stored bytes go to the device and the Triton decoder (:mod:`kvfast.kernels.expcode`)
writes straight into the pages. Any device.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from kvfast.cache.pages import KVPages
from kvfast.errors import CodecError
from kvfast.format import ChunkInfo, KvfReader


def copy_chunks(reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool,
                on_layer: Callable[[int], None] | None = None, *, threads: int = 1, decoder: str = "auto",
                device_decode: bool | None = None) -> None:
    """The first ``n`` tokens of every layer into ``slots`` (``[n]`` int64) of ``pages``; ``on_layer(l)`` after
    layer ``l`` (layers are stored layer-major, so they complete in order). Coded chunks are decoded on the host,
    or by the Triton decoder into the pages when ``device_decode`` (default: for CUDA pages; tests force it on CPU
    pages to run the kernel in Triton's interpreter)."""
    staging = np.empty(max(c.raw_length for c in reader.chunks), dtype=np.uint8)
    device_decode = pages.device.type == "cuda" if device_decode is None else device_decode
    for chunk in reader.chunks:
        if chunk.start >= n:
            continue
        stop = min(chunk.stop, n)
        t = stop - chunk.start
        if device_decode and chunk.length != chunk.raw_length:
            _decode_into_pages(reader, pages, chunk, slots[chunk.start : stop], verify)
        else:
            data = reader.read_chunk(chunk, staging[: chunk.raw_length], verify=verify, threads=threads,
                                     backend=decoder)
            k, v = reader.split_chunk(chunk, data)
            pages.write(chunk.layer, slots[chunk.start : stop], k[:t].to(pages.device), v[:t].to(pages.device))
        if on_layer is not None and stop == n:
            on_layer(chunk.layer)


def _decode_into_pages(reader: KvfReader, pages: KVPages, chunk: ChunkInfo, slots: torch.Tensor,
                       verify: bool) -> None:
    """One coded chunk: stored bytes read and checked on the host, decoded on the pages' device into them."""
    from kvfast.format.codec import expcode
    from kvfast.kernels import expcode as expcode_kernels

    stored = reader.read_stored(chunk, verify=verify)
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
    """:func:`copy_chunks` behind a LoadHandle: inline when ``blocking``, else on one background thread."""

    def __init__(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool, *,
                 close_reader: bool, blocking: bool, threads: int = 1, decoder: str = "python"):
        self._ready = [False] * pages.num_layers
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        args = (reader, pages, slots, n, verify, close_reader, threads, decoder)
        if blocking:
            self._run(*args)
        else:
            threading.Thread(target=self._run, args=args, name="kvfast-load", daemon=True).start()

    def _run(self, reader: KvfReader, pages: KVPages, slots: torch.Tensor, n: int, verify: bool, close_reader: bool,
             threads: int, decoder: str) -> None:
        try:
            copy_chunks(reader, pages, slots, n, verify, on_layer=self._layer_done, threads=threads, decoder=decoder)
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
