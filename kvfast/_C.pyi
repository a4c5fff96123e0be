"""Type stubs for kvfast._C, the native extension built from csrc/."""

from collections.abc import Sequence

import numpy as np
from typing_extensions import Buffer

def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC-32C of a contiguous buffer, continuing from ``value`` (0 to start). Releases the GIL."""

def crc32c_impl() -> str:
    """Which CRC-32C implementation runs: ``"avx512-vpclmulqdq"``, ``"sse4.2"`` or ``"software"``."""

def expcode_encode(k: Buffer, v: Buffer, tokens: int, heads: int, head_dim: int, itemsize: int, seg_tokens: int,
                   threads: int = 1, *, repeats: bool) -> bytes:
    """expcode (docs/FORMAT.md §7.1; ``repeats``: v2, §7.2, else v1): the coded bytes of one chunk whose K and V
    are C-contiguous ``[tokens, heads, head_dim]`` floats of ``itemsize`` (2 or 4) bytes, in segments of
    ``seg_tokens`` tokens (``[1, tokens]``). Planes are encoded on up to ``threads`` threads, GIL released; the
    bytes equal :func:`kvfast.codec.expcode.encode`'s. ``ValueError`` for inconsistent sizes."""

def expcode_decode(src: Buffer, out: Buffer, tokens: int, heads: int, head_dim: int, itemsize: int,
                   threads: int = 1, *, repeats: bool) -> None:
    """Decode one expcode chunk (``repeats``: v2, else v1) ``src`` into ``out`` (writable, C-contiguous,
    ``2 * tokens * heads * head_dim * itemsize`` bytes: K then V, NHD) on up to ``threads`` threads, GIL released.
    Every size, table and stream is checked (§7.1, §7.2); ``ValueError`` naming the field when one is inconsistent
    (``out`` may then be partly written)."""

def gather_pages(pages: Buffer, block_table: np.ndarray, num_tokens: int, out: Buffer) -> None:
    """Tokens ``[0, num_tokens)`` of the sequence over ``block_table`` out of one layer's K or V ``pages`` (a uint8
    array as :class:`LoadJob` takes for one destination, strided ``head_dim`` included) into ``out`` (writable,
    C-contiguous, ``num_tokens * H * head_bytes`` bytes: packed rows, NHD, as a .kvf chunk holds them). The
    mirror of a load's scatter, on the calling thread, GIL released. ``ValueError`` on inconsistent arguments."""

class LoadJob:
    """A load of .kvf chunks into host paged K/V pages, running on its own threads (csrc/paged_loader.h).

    Starts on construction; dropping it cancels and joins the threads. kvfast.loader is its only caller: it
    passes the chunk index kvfast.open validated, and the binding checks every index and shape once more.

    Args:
        fd: the open .kvf file (the job reads through its own duplicate; ``fd`` may be closed afterwards).
        chunks: ``[n, 7]`` int64 rows ``(index, layer, start, stop, offset, length, crc32c)`` in file order,
            each chunk holding K then V ``[stop - start, H, head_bytes]``.
        dests: per layer ``(K pages, V pages)``, each a writable uint8 array
            ``[num_blocks, block_size, H, head_bytes]``, or ``[num_blocks, block_size, H, head_dim, itemsize]``
            (itemsize 2, 4 or 8) whose ``head_dim`` axis may be strided, with any non-negative strides and a
            contiguous last axis (NHD pages as they are; HND pages as a ``permute(0, 2, 1, 3)`` view). All of one
            shape; every layer's K with layer 0's K strides, every V with layer 0's V strides.
        block_table: ``[>= ceil(num_tokens / block_size)]`` int64 block ids; token ``t`` goes to block
            ``block_table[t // block_size]``, row ``t % block_size``.
        num_tokens: tokens ``[0, num_tokens)`` are stored; a chunk's later tokens are read and checked only.
        method: ``"preadv"``, ``"mmap"`` or ``"odirect"``.
        threads: worker threads (at most one per chunk).
        verify: check each chunk's CRC-32C.
        piece_bytes: bytes per read + checksum step.

    Raises:
        ValueError: inconsistent arguments. OSError: the file cannot be read with ``method``.
    """

    method: str
    threads: int

    def __init__(self, fd: int, chunks: np.ndarray, dests: Sequence[tuple[Buffer, Buffer]], block_table: np.ndarray,
                 num_tokens: int, *, method: str = "preadv", threads: int = 1, verify: bool = True,
                 piece_bytes: int = 262144) -> None: ...
    def layer_ready(self, layer: int) -> bool:
        """Whether every chunk of ``layer`` in the plan is loaded (and checked)."""
    def wait_layer(self, layer: int, timeout: float = -1.0) -> bool:
        """Block (GIL released) until ``layer`` is ready or the job finished; ``timeout < 0``: no limit.
        Returns False on timeout."""
    def wait(self, timeout: float = -1.0) -> bool:
        """Block (GIL released) until every worker stopped; False on timeout."""
    def finished(self) -> bool: ...
    def error(self) -> tuple[str, int, int, int, str] | None:
        """``None``, or the first failure in file order: ``(kind, plan position, errno, file offset, detail)`` with
        kind ``"truncated"``, ``"checksum"``, ``"os"`` or ``"cancelled"``."""
    def cancel(self) -> None:
        """Stop after the chunks in flight (the job's error becomes ``"cancelled"`` unless it already failed)."""
