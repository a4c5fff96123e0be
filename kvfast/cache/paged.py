"""The paged KV cache: fixed-size blocks shared by reference count between sequences.

Storage is one tensor per cache, ``[num_layers, 2 (K, V), *layer_shape]`` with ``layer_shape`` in vLLM's
NHD ``[num_blocks, block_size, H, D]`` or FlashInfer's HND ``[num_blocks, H, block_size, D]``; a token at
position ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvfast.cache import ops
from kvfast.cache.pages import KVPages
from kvfast.errors import CacheFullError
from kvfast.identity import kv_shape


@dataclass
class KVSequence:
    """One sequence's view of the cache: its blocks in order and how many tokens it holds.

    Returned by :func:`kvfast.load`, :meth:`PagedKVCache.new_sequence` and :meth:`PagedKVCache.fork`.
    """

    seq_id: int
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockAllocator:
    """Free list plus reference counts. A block returns to the free list when its count drops to 0."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refcount = np.zeros(num_blocks, dtype=np.int64)
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with count 1; all or nothing."""
        if n > len(self._free):
            raise CacheFullError(f"need {n} free blocks, {len(self._free)} of {self.num_blocks} left; free "
                                 "sequences or create the cache with more num_blocks")
        # Ctrl-C raises KeyboardInterrupt only at a call or a loop's jump: everything a call may interrupt is done
        # before the first change, and the changes themselves (slicing, deleting, a numpy store) contain no such
        # point. So an allocation happens whole or not at all, never with blocks popped and lost.
        cut = len(self._free) - n
        blocks = self._free[cut:][::-1]  # pop() order: low block ids first
        del self._free[cut:]
        self.refcount[blocks] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        np.add.at(self.refcount, blocks, 1)

    def decref(self, blocks: list[int]) -> None:
        held = np.bincount(np.asarray(blocks, dtype=np.int64), minlength=self.num_blocks)
        if (held > self.refcount).any():  # check first, so a bad call changes nothing
            raise RuntimeError(f"blocks {np.flatnonzero(held > self.refcount).tolist()} freed more often than held")
        freed = [b for b in dict.fromkeys(blocks) if self.refcount[b] == held[b]]  # in the order given
        # As in allocate: both changes are free of the points where Ctrl-C can interrupt (an in-place operator
        # is not a call), so a free is never half done.
        self.refcount -= held
        self._free += freed


class PagedKVCache:
    """Per-layer paged K and V for many sequences, with copy-on-write sharing.

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        num_blocks: blocks per layer (each holds ``block_size`` tokens of K and of V).
        block_size: tokens per block.
        dtype, device: of the storage.
        layout: ``"NHD"`` (vLLM FlashAttention) or ``"HND"`` (FlashInfer).

    Example:
        >>> cache = PagedKVCache(2, 4, 8, num_blocks=8, block_size=16, dtype=torch.float32)
        >>> seq = cache.new_sequence()
        >>> slots = cache.append_slots(seq, 20)          # [20] slot ids, 2 blocks
        >>> k = torch.randn(20, 4, 8)
        >>> cache.write(0, slots, k, k)
        >>> torch.equal(cache.gather(seq, 0)[0], k)
        True
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 layout: str = "NHD"):
        ops.check_layout(layout)
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size, self.layout = num_blocks, block_size, layout
        self.dtype, self.device = dtype, torch.device(device)
        page = (block_size, num_kv_heads, head_dim) if layout == "NHD" else (num_kv_heads, block_size, head_dim)
        # [num_layers, 2, num_blocks, *page]: zero-filled so no read ever sees another process's old memory
        self.storage = torch.zeros(num_layers, 2, num_blocks, *page, dtype=dtype, device=self.device)
        # "cuda" -> "cuda:N": every tensor, stream and launch for this cache then names its device, whichever
        # device is current when they are made.
        self.device = self.storage.device
        self.pages = KVPages([self.storage[i, 0] for i in range(num_layers)],
                             [self.storage[i, 1] for i in range(num_layers)], layout=layout)
        self.allocator = BlockAllocator(num_blocks)
        self._next_seq_id = 0

    @classmethod
    def for_model(cls, model: Any, *, num_blocks: int, block_size: int = 16, layout: str = "NHD",
                  device: str | torch.device | None = None) -> PagedKVCache:
        """A cache shaped for a transformers model: its layers, KV heads, head_dim, dtype and device."""
        layers, kv_heads, head_dim = kv_shape(model.config)
        return cls(layers, kv_heads, head_dim, num_blocks=num_blocks, block_size=block_size, dtype=model.dtype,
                   device=device if device is not None else model.device, layout=layout)

    # -- per-layer views (what kernels and serving stacks see) -------------------------------------------
    def key_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s K pages, ``[num_blocks, block_size, H, D]`` (NHD) or ``[num_blocks, H, block_size, D]``."""
        return self.pages.keys[layer]

    def value_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s V pages, same shape as :meth:`key_cache`."""
        return self.pages.values[layer]

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.allocator.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return self.pages.blocks_for(num_tokens)

    # -- sequences --------------------------------------------------------------------------------------
    def new_sequence(self) -> KVSequence:
        """An empty sequence; grow it with :meth:`append_slots`."""
        seq = KVSequence(self._next_seq_id)
        self._next_seq_id += 1
        return seq

    def append_slots(self, seq: KVSequence, n: int) -> torch.Tensor:
        """Reserve slots for ``n`` more tokens of ``seq`` and return them, ``[n]`` int64 on the cache's device.

        Allocates new blocks as needed. If the last block is partly filled and shared with another sequence,
        it is copied first (copy on write), so the other sequence never sees these tokens. All or nothing:
        raises :class:`CacheFullError` without changing ``seq`` when blocks run out.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        start = seq.num_tokens
        partial = start % self.block_size != 0
        cow = partial and n > 0 and self.allocator.refcount[seq.block_table[-1]] > 1
        need = self.blocks_for(start + n) - len(seq.block_table) + int(cow)
        new = self.allocator.allocate(need) if need > 0 else []
        if cow:
            old, copy = seq.block_table[-1], new.pop(0)
            self.storage[:, :, copy] = self.storage[:, :, old]
            self.allocator.decref([old])
            seq.block_table[-1] = copy
        seq.block_table.extend(new)
        seq.num_tokens = start + n
        return self.slot_mapping(seq, start, start + n)

    def slot_mapping(self, seq: KVSequence, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Slots of positions ``[start, stop)`` of ``seq``, ``[stop - start]`` int64."""
        stop = seq.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= seq.num_tokens:
            raise IndexError(f"positions {start}:{stop} outside the sequence's {seq.num_tokens} tokens")
        return self.pages.slot_mapping(seq.block_table, start, stop)

    def fork(self, seq: KVSequence, num_tokens: int | None = None) -> KVSequence:
        """A new sequence sharing ``seq``'s blocks (no copy); either may then grow independently.

        Args:
            seq: the sequence to share.
            num_tokens: share only the first ``num_tokens`` tokens (a prefix); default all. The child holds
                only the blocks that prefix touches; a partly covered last block stays shared until the
                child writes into it (copy on write in :meth:`append_slots`).

        Returns:
            The new sequence, ``num_tokens`` long.

        Example:
            >>> child = cache.fork(doc, num_tokens=48)  # doctest: +SKIP
        """
        n = seq.num_tokens if num_tokens is None else num_tokens
        if not 0 <= n <= seq.num_tokens:
            raise ValueError(f"num_tokens must be in [0, {seq.num_tokens}], got {num_tokens}")
        blocks = seq.block_table[: self.blocks_for(n)]
        self.allocator.incref(blocks)
        child = self.new_sequence()
        child.block_table, child.num_tokens = list(blocks), n
        return child

    def truncate(self, seq: KVSequence, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of ``seq``: whole blocks past them are released; a kept,
        partly filled block that another sequence shares is copied before the next write (copy on write), so the
        other sequence is untouched."""
        if not 0 <= num_tokens <= seq.num_tokens:
            raise ValueError(f"num_tokens must be in [0, {seq.num_tokens}], got {num_tokens}")
        blocks = self.blocks_for(num_tokens)
        self.allocator.decref(seq.block_table[blocks:])
        del seq.block_table[blocks:]
        seq.num_tokens = num_tokens

    def free(self, seq: KVSequence) -> None:
        """Drop ``seq``'s block references; blocks no other sequence holds return to the free list."""
        self.allocator.decref(seq.block_table)
        seq.block_table, seq.num_tokens = [], 0  # no call between: a second free of seq (after Ctrl-C) is a no-op

    # -- data -------------------------------------------------------------------------------------------
    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` (``[n, H, D]``, the cache's dtype) of layer ``layer`` at ``slot_mapping`` (-1 skips)."""
        self.pages.write(layer, slot_mapping, k, v)

    def gather(self, seq: KVSequence, layer: int, start: int = 0,
               stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies of K and V of ``seq`` at ``layer`` for positions ``[start, stop)``, each ``[n, H, D]``."""
        stop = seq.num_tokens if stop is None else stop
        if not 0 <= start <= stop <= seq.num_tokens:
            raise IndexError(f"positions {start}:{stop} outside the sequence's {seq.num_tokens} tokens")
        return self.pages.gather(layer, seq.block_table, stop, start)

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"blocks={self.num_blocks}x{self.block_size}, dtype={self.dtype}, layout={self.layout}, "
                f"used={self.num_used_blocks})")
