"""Triton decoder of expcode chunks (docs/FORMAT.md §7.1, §7.2) that writes straight into paged K/V caches.

One program decodes ``BLOCK`` segments side by side, one per lane: each lane walks its own bit stream (a
12-bit peek, one table lookup per symbol), merges each symbol with its raw bytes and stores the float at the
address the slot mapping gives its row's token. Segments are independent and their output addresses are known
in advance, so every segment of a chunk decodes at once. An expcode-v2 chunk's repeated rows are then copied
from their sources, page to page, by one indexed copy per half.

The host (:func:`decode_paged`) checks the header, segment directory and code tables with the numpy reference
(:mod:`kvfast.format.codec.expcode`) before launch, so the kernel trusts the sizes; each lane still reads only inside
its own segment and reports whether its stream was exactly consumed, which the host checks after the launch.

Runs compiled on a GPU and, with ``TRITON_INTERPRET=1``, on CPU tensors (the tests).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl

from kvfast.format.codec import expcode
from kvfast.errors import CodecError

_BLOCK = 32  # segments per program


@triton.jit
def _decode_kernel(
    data_ptr,  # [length] uint8: the chunk's stored bytes
    lut_ptr,  # [2H, 4096] int32: symbol | code length << 8 for each 12-bit peek (length 0: no code)
    seg_start_ptr, seg_bytes_ptr,  # [num_segments] int64: byte offset in data, byte length
    seg_plane_ptr, seg_row_ptr, seg_count_ptr,  # [num_segments] int64: plane, first kept row, symbols
    status_ptr,  # [num_segments] int64 out: bits consumed, or -1 (no code, stream not exactly consumed)
    k_ptr, v_ptr,  # [num_blocks, block_size, H, HEAD_DIM] words (int16 / int32), token-major strided views
    kept_ptr,  # [kept K rows + kept V rows] int64: the token of each kept row
    slot_ptr,  # [num_tokens] int64: block_idx * block_size + block_offset, or -1 (not stored)
    num_segments, num_heads, kept_k, raw_offset, block_size,
    k_block_stride, k_token_stride, k_head_stride, v_block_stride, v_token_stride, v_head_stride,
    HEAD_DIM: tl.constexpr, ITEMSIZE: tl.constexpr, MAX_SYMBOLS: tl.constexpr, BLOCK: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = seg < num_segments
    seg = tl.where(live, seg, 0)
    plane = tl.load(seg_plane_ptr + seg, mask=live, other=0)
    kv = plane // num_heads
    head = plane % num_heads
    row0 = kv * kept_k + tl.load(seg_row_ptr + seg, mask=live, other=0)  # kept K rows first, then kept V rows
    count = tl.load(seg_count_ptr + seg, mask=live, other=0)
    start = tl.load(seg_start_ptr + seg, mask=live, other=0)
    nbytes = tl.load(seg_bytes_ptr + seg, mask=live, other=0)

    pos = tl.zeros([BLOCK], dtype=tl.int64)  # bit position in the segment
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    for i in range(MAX_SYMBOLS):
        active = i < count
        byte = pos >> 3
        # 24 bits from the peek's byte on; bytes past the segment's end read as zero
        b0 = tl.load(data_ptr + start + byte, mask=active & (byte < nbytes), other=0).to(tl.int64)
        b1 = tl.load(data_ptr + start + byte + 1, mask=active & (byte + 1 < nbytes), other=0).to(tl.int64)
        b2 = tl.load(data_ptr + start + byte + 2, mask=active & (byte + 2 < nbytes), other=0).to(tl.int64)
        peek = (((b0 << 16) | (b1 << 8) | b2) >> (12 - (pos & 7))) & 0xFFF
        entry = tl.load(lut_ptr + plane * 4096 + peek, mask=active, other=0).to(tl.int64)
        length = entry >> 8
        bad = bad | (active & (length == 0))
        pos += tl.where(active, length, 0)

        row = row0 + i // HEAD_DIM
        d = i % HEAD_DIM
        elem = (row * num_heads + head) * HEAD_DIM + d
        word = (entry & 0xFF) << (8 * ITEMSIZE - 8)
        for j in tl.static_range(ITEMSIZE - 1):
            raw = tl.load(data_ptr + raw_offset + elem * (ITEMSIZE - 1) + j, mask=active, other=0)
            word |= raw.to(tl.int64) << (8 * j)
        bits = (word >> 1) | ((word & 1) << (8 * ITEMSIZE - 1))  # rotate right: the sign back on top
        if ITEMSIZE == 2:
            value = bits.to(tl.int16, bitcast=False)
        else:
            value = bits.to(tl.int32, bitcast=False)

        tok = tl.load(kept_ptr + row, mask=active, other=0)
        slot = tl.load(slot_ptr + tok, mask=active, other=-1)
        store = active & (slot >= 0)
        slot = tl.maximum(slot, 0)  # masked-off lanes still compute an address inside the cache
        block_idx = slot // block_size
        block_offset = slot % block_size
        tl.store(k_ptr + block_idx * k_block_stride + block_offset * k_token_stride + head * k_head_stride + d,
                 value, mask=store & (kv == 0))
        tl.store(v_ptr + block_idx * v_block_stride + block_offset * v_token_stride + head * v_head_stride + d,
                 value, mask=store & (kv == 1))

    last = tl.load(data_ptr + start + nbytes - 1, mask=live & (nbytes > 0), other=0).to(tl.int64)
    padding = tl.where((pos & 7) != 0, last & (0xFF >> (pos & 7)), 0)
    exact = ((pos + 7) >> 3 == nbytes) & (padding == 0) & (bad == 0)
    tl.store(status_ptr + seg, tl.where(exact, pos, -1), mask=live)


def decode_paged(stored: np.ndarray, k_pages: torch.Tensor, v_pages: torch.Tensor, slot_mapping: torch.Tensor, *,
                 repeats: bool, where: str = "chunk") -> None:
    """Decode one expcode chunk (``repeats``: expcode-v2, else v1) into paged caches.

    Args:
        stored: ``[length]`` uint8, the chunk's stored bytes (already checksummed), coded (``length < raw_length``).
        k_pages, v_pages: ``[num_blocks, block_size, H, head_dim]`` float16/bfloat16/float32 token-major views of one
            layer's K and V pages (an HND cache as ``permute(0, 2, 1, 3)``), innermost axis contiguous; written in
            place.
        slot_mapping: ``[t]`` int64 on the pages' device, the chunk's tokens: ``block_idx * block_size +
            block_offset``, or ``-1`` for a token not to store (past a loaded prefix: the ``-1`` entries are a
            suffix).
        repeats: The chunk lists repeated rows (``expcode-v2``, §7.2) or not (``expcode-v1``): the manifest's codec
            says.

    Raises :class:`CodecError` naming ``where`` when the bytes are inconsistent (before launch for sizes and
    tables, after it for bit streams: the pages of the chunk's tokens then hold garbage and must be discarded).

    Example:
        >>> decode_paged(reader.read_stored(chunk), k_cache, v_cache, slots, repeats=True)  # doctest: +SKIP
    """
    num_blocks, block_size, heads, head_dim = k_pages.shape
    itemsize = k_pages.element_size()
    t = slot_mapping.numel()
    if k_pages.stride(3) != 1 or v_pages.stride(3) != 1 or v_pages.shape != k_pages.shape:
        raise ValueError("k_pages and v_pages must be [num_blocks, block_size, H, head_dim] with a contiguous "
                         "last axis")
    lay = expcode.parse_layout(stored, t, heads, head_dim, itemsize, where, repeats)
    luts = np.empty((lay.num_planes, 1 << expcode.MAX_CODE_BITS), dtype=np.int32)
    for p in range(lay.num_planes):
        symbol, length = expcode.decode_table(expcode.unpack_table(stored, int(lay.table_offsets[p])),
                                              f"{where} table {p}")
        luts[p] = symbol.astype(np.int32) | (length.astype(np.int32) << 8)
    # per segment: byte offset, byte length, plane, first kept row, symbols -- one copy to the device
    segs = np.array([(lay.seg_offsets[s], lay.seg_offsets[s + 1] - lay.seg_offsets[s], p, row0, rows * head_dim)
                     for s, p, _, _, row0, rows in lay.segments()], dtype=np.int64).T.copy()
    device = k_pages.device

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    status = torch.empty(lay.num_segments, dtype=torch.int64, device=device)
    words = {2: torch.int16, 4: torch.int32}[itemsize]
    k_words, v_words = k_pages.view(words), v_pages.view(words)
    # Triton launches on the current device (and its current stream): make it the pages' device, whichever thread
    # (a load's own) and device were current.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _decode_kernel[(triton.cdiv(lay.num_segments, _BLOCK),)](
            dev(np.require(stored, requirements="W")), dev(luts),
            *dev(segs),
            status, k_words, v_words, dev(np.concatenate(lay.kept)), slot_mapping,
            lay.num_segments, heads, len(lay.kept[0]), lay.raw, block_size,
            k_words.stride(0), k_words.stride(1), k_words.stride(2), v_words.stride(0), v_words.stride(1),
            v_words.stride(2),
            # a bound, not the longest segment: one compiled kernel per chunk shape, however many rows repeat
            HEAD_DIM=head_dim, ITEMSIZE=itemsize, MAX_SYMBOLS=lay.seg_tokens * head_dim, BLOCK=_BLOCK,
        )
    failed = torch.nonzero(status < 0)
    if failed.numel():
        s = int(failed[0])
        raise CodecError(f"{where} segment {s}: the bit stream holds no valid code sequence of its length")
    for pages, rep in zip((k_pages, v_pages), lay.repeats):
        if len(rep):  # sources are kept rows, written above; a stored row's source is stored (-1: a suffix)
            rows, sources = slot_mapping[dev(np.ascontiguousarray(rep.T))]  # one copy to the device
            sources = sources[rows >= 0]
            rows = rows[rows >= 0]
            pages[rows // block_size, rows % block_size] = pages[sources // block_size, sources % block_size]
