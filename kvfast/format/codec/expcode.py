"""expcode: the lossless exponent codec, as a clear numpy reference (docs/FORMAT.md §7.1, §7.2).

Every float is rotated left by one bit, so its top byte is the exponent (bf16, fp32; fp16: the 5 exponent bits
and the top 3 mantissa bits) and the rest is mantissa and sign:

    bf16  s eeeeeeee mmmmmmm          -> eeeeeeee | mmmmmmm s        symbol = exponent, 1 raw byte
    fp16  s eeeee mmmmmmmmmm          -> eeeeemmm | mmmmmmm s        symbol = exponent + 3 mantissa bits, 1 raw byte
    fp32  s eeeeeeee m{23}            -> eeeeeeee | m{23} s          symbol = exponent, 3 raw bytes

The raw bytes are stored as they are (they are close to random); the symbols (~2.6 bits of information in KV)
are Huffman-coded with one canonical code per (K/V, KV head) plane of the chunk, codes at most 12 bits long so
that a 4096-entry table decodes them. Each plane is cut into segments of ``seg_tokens`` tokens, each its own
byte-aligned bit stream, so that segments decode independently (threads, GPU programs) and each writes to an
address known in advance.

``expcode-v2`` (§7.2) adds one thing: a token's K (or V) row that repeats an earlier row of the chunk bit for bit is
not coded but listed as (row, source). Layer 0's V of a RoPE model depends on the token id alone, so every
repeated token repeats it (bench/RESULTS.md, "Lossless codec", says how often). ``expcode-v1`` is
``expcode-v2`` without the list; one code path reads both (``repeats=False`` for v1).

This module is the oracle for the C++ (csrc/expcode.cpp) and Triton (kernels/expcode.py) implementations:
they produce and accept exactly these bytes.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvfast.errors import CodecError

NAMES = {"expcode-v1": False, "expcode-v2": True}  # codec name -> whether its chunks list repeated rows
MAX_CODE_BITS = 12  # longest code; the decoder's lookup table has 2**12 entries
HEADER_BYTES = 4  # u32 seg_tokens
REPEATS_HEAD_BYTES = 8  # v2: u32 repeated K rows, u32 repeated V rows; then a (u32 row, u32 source) pair each
TABLE_HEAD_BYTES = 2  # a code table: u8 first symbol, u8 last symbol, then 4-bit code lengths of first..last
SEGMENT_ELEMENTS = 4096  # target symbols per segment (see default_seg_tokens)

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def default_seg_tokens(head_dim: int, num_tokens: int) -> int:
    """Tokens per segment the writer uses for a chunk of ``num_tokens``: about :data:`SEGMENT_ELEMENTS` symbols
    per segment, and at least two segments per plane where the chunk has two tokens, so the C++ decoder always
    has two independent streams to interleave (small head_dim: +70% decode speed for stories260K's shape)."""
    return max(1, min(SEGMENT_ELEMENTS // head_dim, -(-num_tokens // 2)))


# -- the bit split ---------------------------------------------------------------------------------------
def split(words: np.ndarray, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    """(symbols ``[n]`` uint8, raw ``[n, itemsize - 1]`` uint8) of ``words``, the floats' bits as unsigned ints."""
    bits = 8 * itemsize
    w = ((words << 1) | (words >> (bits - 1))).astype(words.dtype)  # rotate left: sign to bit 0
    symbols = (w >> (bits - 8)).astype(np.uint8)
    raw = w.astype("<u4").view(np.uint8).reshape(-1, 4)[:, : itemsize - 1]
    return symbols, raw


def merge(symbols: np.ndarray, raw: np.ndarray, itemsize: int) -> np.ndarray:
    """The inverse of :func:`split`: the floats' bits ``[n]`` as unsigned ints of ``itemsize`` bytes."""
    bits = 8 * itemsize
    w = symbols.astype(np.uint32) << (bits - 8)
    for i in range(itemsize - 1):
        w |= raw[:, i].astype(np.uint32) << (8 * i)
    u = (w >> 1) | ((w & 1) << (bits - 1))  # rotate right: sign back to the top
    return u.astype(_UINT[itemsize])


# -- canonical Huffman codes -----------------------------------------------------------------------------
def code_lengths(freq: np.ndarray) -> np.ndarray:
    """Code length (0..12) per symbol for symbol counts ``freq`` ``[256]``; 0 for absent symbols.

    Huffman's algorithm with two queues (leaves sorted by (count, symbol); on equal weights a leaf is taken
    before a merged node), so every implementation gets the same lengths. While the longest code exceeds
    12 bits, every count is halved (rounding up, so present symbols stay present) and the code rebuilt.
    """
    freq = np.asarray(freq, dtype=np.uint64).copy()
    present = np.flatnonzero(freq)
    lengths = np.zeros(256, dtype=np.uint8)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    while True:
        depth = _huffman_depths([(int(freq[s]), int(s)) for s in present])
        if max(depth) <= MAX_CODE_BITS:
            for (_, symbol), d in zip(sorted((int(freq[s]), int(s)) for s in present), depth):
                lengths[symbol] = d
            return lengths
        freq[present] = (freq[present] + 1) // 2


def _huffman_depths(leaves: list[tuple[int, int]]) -> list[int]:
    """Depth of each leaf of the Huffman tree over ``leaves`` [(count, symbol)], in (count, symbol) order."""
    leaves = sorted(leaves)
    m = len(leaves)
    weight = [c for c, _ in leaves]
    parent = [0] * (2 * m - 1)
    li, ni = 0, m  # next unused leaf; next unused merged node (merged nodes are numbered m, m+1, ...)

    def take() -> int:
        nonlocal li, ni
        if li < m and (ni == len(weight) or weight[li] <= weight[ni]):
            li += 1
            return li - 1
        ni += 1
        return ni - 1

    while len(weight) < 2 * m - 1:
        a, b = take(), take()
        parent[a] = parent[b] = len(weight)
        weight.append(weight[a] + weight[b])
    depth = [0] * (2 * m - 1)
    for node in range(2 * m - 3, -1, -1):  # the root (2m-2) has depth 0; parents come after their children
        depth[node] = depth[parent[node]] + 1
    return depth[:m]


def _code_order(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(present symbols in code order, each one's first 12-bit window): canonical codes are the running Kraft sum.

    Sorted by (length, symbol), symbol ``i`` owns the ``2**(12 - len_i)`` consecutive 12-bit windows starting at
    ``sum_{j < i} 2**(12 - len_j)``, and its code is that start shifted down to ``len_i`` bits."""
    present = np.flatnonzero(lengths)
    order = present[np.lexsort((present, lengths[present]))]
    widths = np.left_shift(1, MAX_CODE_BITS - lengths[order].astype(np.int64))
    return order, np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (``[256]`` uint32, MSB first in its length): shorter codes first, and within
    one length in symbol order (as DEFLATE, RFC 1951 §3.2.2)."""
    order, starts = _code_order(lengths)
    codes = np.zeros(256, dtype=np.uint32)
    codes[order] = starts >> (MAX_CODE_BITS - lengths[order].astype(np.int64))
    return codes


def decode_table(lengths: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, length) ``[4096]`` each: the entry for the next 12 bits of a stream. Length 0 marks bits that
    start no code. Raises :class:`CodecError` for lengths no prefix code has (Kraft sum above 1)."""
    if lengths.max() > MAX_CODE_BITS or not lengths.any():
        raise CodecError(f"{where}: code lengths must be 1..{MAX_CODE_BITS} for at least one symbol")
    order, starts = _code_order(lengths)
    widths = np.left_shift(1, MAX_CODE_BITS - lengths[order].astype(np.int64))
    used = int(widths.sum())
    if used > 1 << MAX_CODE_BITS:
        raise CodecError(f"{where}: code lengths are over-subscribed (Kraft sum > 1)")
    symbol = np.zeros(1 << MAX_CODE_BITS, dtype=np.uint8)
    length = np.zeros(1 << MAX_CODE_BITS, dtype=np.uint8)
    symbol[:used] = np.repeat(order, widths)
    length[:used] = np.repeat(lengths[order], widths)
    return symbol, length


def pack_table(lengths: np.ndarray) -> bytes:
    """A plane's code table (§7.1): first and last present symbol, then the code lengths of ``first..last``, two
    per byte (``first + 2i`` in the low nibble of byte ``i``, ``first + 2i + 1`` in the high one). KV exponents
    span a few dozen values, so this is ~20 bytes where all 256 lengths would take 128."""
    present = np.flatnonzero(lengths)
    first, last = int(present[0]), int(present[-1])
    span = np.zeros(2 * ((last - first + 2) // 2), dtype=np.uint8)
    span[: last - first + 1] = lengths[first : last + 1]
    return bytes([first, last]) + (span[0::2] | (span[1::2] << 4)).astype(np.uint8).tobytes()


def table_size(data: np.ndarray, offset: int) -> int:
    """Bytes of the table at ``offset`` (its first two bytes must be readable)."""
    return TABLE_HEAD_BYTES + (int(data[offset + 1]) - int(data[offset]) + 2) // 2


def unpack_table(data: np.ndarray, offset: int) -> np.ndarray:
    """Code lengths ``[256]`` of the table at ``offset`` (checked to lie inside ``data`` by :func:`parse_layout`)."""
    first, last = int(data[offset]), int(data[offset + 1])
    nibbles = data[offset + TABLE_HEAD_BYTES : offset + table_size(data, offset)]
    span = np.empty(2 * len(nibbles), dtype=np.uint8)
    span[0::2], span[1::2] = nibbles & 0x0F, nibbles >> 4
    lengths = np.zeros(256, dtype=np.uint8)
    lengths[first : last + 1] = span[: last - first + 1]
    return lengths


# -- the chunk layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where everything is in one encoded chunk of ``t`` tokens (§7.1, §7.2); every offset checked against
    ``length``.

    Half 0 is K, half 1 is V. A half's *kept* rows are its tokens that are not repeats (v1: all of them). Planes
    are K head 0..H-1, then V head 0..H-1; plane ``p`` codes the kept rows of its half, ``seg_tokens`` rows per
    segment, in segments ``plane_segments[p]`` .. ``plane_segments[p + 1] - 1``.
    """

    num_tokens: int
    num_heads: int
    head_dim: int
    itemsize: int
    seg_tokens: int
    repeats: tuple[np.ndarray, np.ndarray]  # per half [r, 2] int64: (row, source), rows increasing
    kept: tuple[np.ndarray, np.ndarray]  # per half: the kept rows, increasing
    table_offsets: np.ndarray  # [2H + 1] int64: where each plane's code table starts (and the last one ends)
    raw: int  # offset of the raw plane: (kept K + kept V rows) x H x head_dim elements x (itemsize - 1) bytes
    directory: int  # offset of the u32 segment lengths
    streams: int  # offset of the first segment's bits
    plane_segments: np.ndarray  # [2H + 1] int64: each plane's first segment (and the total)
    seg_offsets: np.ndarray  # [num_segments + 1] int64, absolute

    @property
    def num_planes(self) -> int:
        return 2 * self.num_heads

    @property
    def num_segments(self) -> int:
        return int(self.plane_segments[-1])

    def segments(self) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(segment, plane, half, head, first kept row, rows) of every segment, in order."""
        for p in range(self.num_planes):
            half, head = divmod(p, self.num_heads)
            n = len(self.kept[half])
            for g, row0 in enumerate(range(0, n, self.seg_tokens)):
                yield int(self.plane_segments[p]) + g, p, half, head, row0, min(self.seg_tokens, n - row0)


def find_repeats(rows: np.ndarray) -> np.ndarray:
    """(row, source) pairs ``[r, 2]`` of ``rows`` ``[t, ...]``: each row equal bit for bit to an earlier one,
    with the first row it equals (so a source is never itself a repeat)."""
    first: dict[bytes, int] = {}
    pairs = []
    for i, row in enumerate(rows):
        source = first.setdefault(row.tobytes(), i)
        if source != i:
            pairs.append((i, source))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _segment_counts(kept: tuple[np.ndarray, np.ndarray], num_heads: int, seg_tokens: int) -> np.ndarray:
    """``plane_segments``: the first segment of each plane, then the number of segments."""
    per_plane = [-(-len(kept[p // num_heads]) // seg_tokens) for p in range(2 * num_heads)]
    return np.concatenate([[0], np.cumsum(per_plane)]).astype(np.int64)


def _parse_repeats(data: np.ndarray, num_tokens: int, where: str) -> tuple[tuple[np.ndarray, ...], int]:
    """v2's repeated-row lists, checked (§7.2), and the offset of the first code table."""
    n = len(data)
    if n < HEADER_BYTES + REPEATS_HEAD_BYTES:
        raise CodecError(f"{where}: {n} bytes, shorter than the {HEADER_BYTES + REPEATS_HEAD_BYTES}-byte header")
    counts = data[HEADER_BYTES : HEADER_BYTES + REPEATS_HEAD_BYTES].view("<u4").astype(np.int64)
    if (counts >= num_tokens).any():
        raise CodecError(f"{where}: {counts.tolist()} repeated rows, but a chunk of {num_tokens} tokens has at most "
                         f"{num_tokens - 1} per half")
    at = HEADER_BYTES + REPEATS_HEAD_BYTES
    end = at + 8 * int(counts.sum())
    if end > n:
        raise CodecError(f"{where}: {n} bytes cannot hold the {int(counts.sum())} repeated-row pairs")
    pairs = data[at:end].view("<u4").astype(np.int64).reshape(-1, 2)
    repeats = (pairs[: counts[0]], pairs[counts[0] :])
    for half, rep in enumerate(repeats):
        rows, sources = rep[:, 0], rep[:, 1]
        repeated = np.zeros(num_tokens, dtype=bool)
        repeated[rows[rows < num_tokens]] = True
        if (np.diff(rows) <= 0).any() or (rows >= num_tokens).any() or (sources >= rows).any() or \
                repeated[sources[sources < num_tokens]].any():
            raise CodecError(f"{where}: the repeated {'KV'[half]} rows are not increasing rows < {num_tokens}, each "
                             f"with an earlier source that is not itself repeated")
    return repeats, end


def parse_layout(data: np.ndarray, num_tokens: int, num_heads: int, head_dim: int, itemsize: int,
                 where: str, repeats: bool = True) -> Layout:
    """Check the header, repeated rows (``repeats``: v2), code tables and segment directory of encoded ``data``
    against its length; :class:`CodecError` else."""
    n = len(data)
    if n < HEADER_BYTES:
        raise CodecError(f"{where}: {n} bytes, shorter than the {HEADER_BYTES}-byte header")
    seg_tokens = int(data[:4].view("<u4")[0])
    if not 1 <= seg_tokens <= num_tokens:
        raise CodecError(f"{where}: seg_tokens {seg_tokens} is outside [1, {num_tokens}]")
    if repeats:
        reps, at = _parse_repeats(data, num_tokens, where)
    else:
        reps, at = (np.zeros((0, 2), dtype=np.int64),) * 2, HEADER_BYTES
    kept = tuple(np.setdiff1d(np.arange(num_tokens), rep[:, 0]) for rep in reps)
    table_offsets = [at]
    for p in range(2 * num_heads):
        at = table_offsets[-1]
        if at + TABLE_HEAD_BYTES > n or data[at] > data[at + 1] or at + table_size(data, at) > n:
            raise CodecError(f"{where}: code table {p} at byte {at} is not a table (first symbol above last, or "
                             f"past the {n} bytes)")
        table_offsets.append(at + table_size(data, at))
    raw = table_offsets[-1]
    plane_segments = _segment_counts(kept, num_heads, seg_tokens)
    directory = raw + (len(kept[0]) + len(kept[1])) * num_heads * head_dim * (itemsize - 1)
    streams = directory + 4 * int(plane_segments[-1])
    if streams > n:
        raise CodecError(f"{where}: {n} bytes cannot hold the tables, raw bytes and directory ({streams} bytes)")
    seg_lengths = data[directory:streams].view("<u4").astype(np.int64)
    seg_offsets = streams + np.concatenate([[0], np.cumsum(seg_lengths)])
    if seg_offsets[-1] != n:
        raise CodecError(f"{where}: segment lengths add up to {seg_offsets[-1] - streams} bytes of streams, "
                         f"but {n - streams} follow the directory")
    return Layout(num_tokens, num_heads, head_dim, itemsize, seg_tokens, reps, kept,
                  np.array(table_offsets, dtype=np.int64), raw, directory, streams, plane_segments, seg_offsets)


# -- reference encoder -----------------------------------------------------------------------------------
def encode(k: np.ndarray, v: np.ndarray, itemsize: int, seg_tokens: int | None = None, repeats: bool = True) -> bytes:
    """Encode one chunk: ``k`` and ``v`` ``[t, H, head_dim]`` unsigned ints of ``itemsize`` bytes (the floats'
    bits); ``repeats``: list repeated rows (expcode-v2) or not (v1). Returns the coded bytes (§7.1), whatever their
    length; :func:`kvfast.format.codec.encode_chunk` decides whether to store them or the raw chunk."""
    t, heads, head_dim = k.shape
    seg_tokens = default_seg_tokens(head_dim, t) if seg_tokens is None else min(seg_tokens, t)
    header = [np.array([seg_tokens], dtype="<u4").tobytes()]
    halves = []
    for x in (k, v):
        rep = find_repeats(x.reshape(t, -1)) if repeats else np.zeros((0, 2), dtype=np.int64)
        halves.append((rep, x[np.setdiff1d(np.arange(t), rep[:, 0])]))
    if repeats:
        header += [np.array([len(rep) for rep, _ in halves], dtype="<u4").tobytes(),
                   *(rep.astype("<u4").tobytes() for rep, _ in halves)]
    symbols, raw = split(np.concatenate([rows.reshape(-1) for _, rows in halves]), itemsize)
    tables, directory, streams = [], [], []
    at = 0
    for _, rows in halves:
        n = len(rows)
        planes = symbols[at : at + rows.size].reshape(n, heads, head_dim).transpose(1, 0, 2)
        at += rows.size
        for plane in planes:
            lengths = code_lengths(np.bincount(plane.reshape(-1), minlength=256))
            codes = canonical_codes(lengths)
            tables.append(pack_table(lengths))
            for g in range(0, n, seg_tokens):
                stream = _pack_bits(plane[g : g + seg_tokens].reshape(-1), codes, lengths)
                directory.append(len(stream))
                streams.append(stream)
    return b"".join([*header, *tables, raw.tobytes(), np.array(directory, dtype="<u4").tobytes(), *streams])


def _pack_bits(symbols: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """The codes of ``symbols`` back to back, MSB first, the last byte padded with zero bits."""
    n = lengths[symbols].astype(np.int64)
    shifts = np.arange(MAX_CODE_BITS - 1, -1, -1)  # bit j of a code, most significant first
    bits = (codes[symbols][:, None].astype(np.int64) >> shifts) & 1  # [count, 12], right-aligned codes
    keep = shifts[None, :] < n[:, None]
    return np.packbits(bits[keep].astype(np.uint8)).tobytes()


# -- reference decoder -----------------------------------------------------------------------------------
def decode(data: np.ndarray, out: np.ndarray, num_tokens: int, num_heads: int, head_dim: int, itemsize: int,
           where: str = "chunk", repeats: bool = True) -> None:
    """Decode coded chunk bytes ``data`` (uint8) into ``out`` (uint8, ``2 * t * H * head_dim * itemsize``
    bytes: K then V ``[t, H, head_dim]``); ``repeats``: the chunk lists repeated rows (v2) or not (v1). Raises
    :class:`CodecError` naming ``where`` and the field at fault on any inconsistency; never reads outside
    ``data``."""
    lay = parse_layout(data, num_tokens, num_heads, head_dim, itemsize, where, repeats)
    kept_rows = len(lay.kept[0]) + len(lay.kept[1])
    symbols = np.empty((kept_rows, num_heads, head_dim), dtype=np.uint8)  # kept K rows, then kept V rows
    tables = [decode_table(unpack_table(data, int(lay.table_offsets[p])), f"{where} table {p}")
              for p in range(lay.num_planes)]
    for s, p, half, head, row0, rows in lay.segments():
        first = half * len(lay.kept[0]) + row0
        symbols[first : first + rows, head] = _unpack_bits(data[lay.seg_offsets[s] : lay.seg_offsets[s + 1]],
                                                           rows * head_dim, tables[p],
                                                           f"{where} segment {s}").reshape(rows, head_dim)
    raw = data[lay.raw : lay.raw + symbols.size * (itemsize - 1)].reshape(-1, itemsize - 1)
    words = merge(symbols.reshape(-1), raw, itemsize).reshape(kept_rows, num_heads, head_dim)
    halves = out.view(_UINT[itemsize]).reshape(2, num_tokens, num_heads, head_dim)
    halves[0, lay.kept[0]] = words[: len(lay.kept[0])]
    halves[1, lay.kept[1]] = words[len(lay.kept[0]) :]
    for half, rep in enumerate(lay.repeats):
        halves[half, rep[:, 0]] = halves[half, rep[:, 1]]  # sources are kept rows, all written above


def _unpack_bits(stream: np.ndarray, count: int, table: tuple[np.ndarray, np.ndarray], where: str) -> np.ndarray:
    """``count`` symbols from ``stream``, which must end in the byte of its last code, padded with zero bits."""
    symbol_of, length_of = table
    padded = np.concatenate([stream, np.zeros(2, dtype=np.uint8)])  # peeks past the end read zeros
    out = np.empty(count, dtype=np.uint8)
    pos = 0
    for i in range(count):
        byte = pos >> 3
        if byte >= len(stream):
            raise CodecError(f"{where}: the stream ends after {i} of {count} symbols")
        window = (int(padded[byte]) << 16) | (int(padded[byte + 1]) << 8) | int(padded[byte + 2])
        peek = (window >> (12 - (pos & 7))) & 0xFFF
        if length_of[peek] == 0:
            raise CodecError(f"{where}: bits at {pos} start no code")
        out[i] = symbol_of[peek]
        pos += int(length_of[peek])
    check_stream_end(stream, pos, where)
    return out


def check_stream_end(stream: np.ndarray, bits: int, where: str) -> None:
    """A segment holds exactly the bytes of its codes, padded with zero bits: else it was altered."""
    if (bits + 7) // 8 != len(stream):
        raise CodecError(f"{where}: codes take {bits} bits but the segment has {len(stream)} bytes")
    if bits & 7 and int(stream[-1]) & (0xFF >> (bits & 7)):
        raise CodecError(f"{where}: padding bits after the last code are not zero")
