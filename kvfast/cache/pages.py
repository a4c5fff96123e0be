"""KV pages: the one description of a paged KV layout, for memory kvfast allocated or an engine owns.

Per layer, K and V are each a tensor of pages in one of two layouts (any strides):

    NHD  [num_blocks, block_size, num_kv_heads, head_dim]   vLLM's FlashAttention backend
    HND  [num_blocks, num_kv_heads, block_size, head_dim]   FlashInfer's other layout (and vLLM CPU's views)

Token ``p`` of a sequence whose blocks are ``block_table`` lives in slot
``block_table[p // block_size] * block_size + p % block_size``. :class:`KVPages` holds no allocator: which blocks
belong to whom is the owner's business (:class:`kvfast.PagedKVCache`, or a serving engine).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvfast._backend import native, paged_kernels
from kvfast.cache import ops
from kvfast.errors import PagesError

LAYOUTS = ops.LAYOUTS


class KVPages:
    """Per-layer K and V page tensors in one layout: what a load fills and attention reads.

    Args:
        keys, values: one tensor per layer, each ``[num_blocks, block_size, H, D]`` (``"NHD"``) or
            ``[num_blocks, H, block_size, D]`` (``"HND"``), all of one shape, dtype and device; any strides (the
            native host loader takes any; the CUDA one needs each row of ``D`` elements contiguous, and falls back
            to the reference path otherwise).
        layout: ``"NHD"`` or ``"HND"``.

    Example:
        >>> k = [torch.zeros(8, 16, 2, 64) for _ in range(4)]            # 4 layers, 8 blocks of 16 tokens
        >>> v = [torch.zeros_like(t) for t in k]
        >>> pages = KVPages(k, v, layout="NHD")
        >>> pages.num_layers, pages.num_blocks, pages.block_size, pages.num_kv_heads, pages.head_dim
        (4, 8, 16, 2, 64)
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, layout: str = "NHD"):
        ops.check_layout(layout)
        if not keys or len(keys) != len(values):
            raise ValueError(f"need one K and one V tensor per layer, got {len(keys)} and {len(values)}")
        tensors = (*keys, *values)
        shapes = {tuple(t.shape) for t in tensors}
        kinds = {(t.dtype, t.device) for t in tensors}
        if len(shapes) != 1 or len(kinds) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"every layer's K and V pages must be 4-D tensors of one shape, dtype and device, got "
                             f"shapes {sorted(shapes)} and {sorted(map(str, kinds))}")
        self.keys, self.values, self.layout = tuple(keys), tuple(values), layout
        shape = keys[0].shape
        self.num_blocks = shape[0]
        self.block_size, self.num_kv_heads = (shape[1], shape[2]) if layout == "NHD" else (shape[2], shape[1])
        self.head_dim = shape[3]
        self.dtype, self.device = keys[0].dtype, keys[0].device

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """``(num_layers, num_kv_heads, head_dim)``, what a .kvf file's KV must have to be loaded here."""
        return self.num_layers, self.num_kv_heads, self.head_dim

    def token_major(self, pages: torch.Tensor) -> torch.Tensor:
        """``pages`` (one layer's K or V) as a ``[num_blocks, block_size, H, D]`` view."""
        return pages.permute(0, 2, 1, 3) if self.layout == "HND" else pages

    def rows_contiguous(self) -> bool:
        """Whether every page tensor keeps each token's ``D`` elements contiguous (what the native GPU loader
        copies)."""
        return all(t.stride(-1) == 1 for t in (*self.keys, *self.values))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_block_ids(self, block_ids: Sequence[int] | np.ndarray | torch.Tensor, num_tokens: int) -> np.ndarray:
        """``block_ids`` as a ``[blocks_for(num_tokens)]`` int64 array, after checking they can take the tokens.

        Raises:
            PagesError: fewer blocks than ``num_tokens`` need, a block id outside ``[0, num_blocks)``, or one block
                named twice (two token ranges would overwrite each other).
        """
        if isinstance(block_ids, torch.Tensor):
            block_ids = block_ids.detach().cpu().numpy()
        ids = np.asarray(block_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise PagesError(f"block_ids must be a 1-D sequence of ints, got {ids.dtype} of shape {ids.shape}")
        need = self.blocks_for(num_tokens)
        if ids.size < need:
            raise PagesError(f"{num_tokens} tokens need {need} blocks of {self.block_size}, got {ids.size} block ids")
        ids = ids[:need].astype(np.int64)
        bad = ids[(ids < 0) | (ids >= self.num_blocks)]
        if bad.size:
            raise PagesError(f"block id {int(bad[0])} is outside the pages' [0, {self.num_blocks})")
        if np.unique(ids).size != ids.size:
            values, counts = np.unique(ids, return_counts=True)
            raise PagesError(f"block id {int(values[counts > 1][0])} is named twice: two token ranges would overlap")
        return ids

    def slot_mapping(self, block_table: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Slots of positions ``[start, stop)`` of a sequence over ``block_table``, ``[stop - start]`` int64 on the
        pages' device."""
        pos = torch.arange(start, stop, dtype=torch.long)
        table = torch.as_tensor(block_table, dtype=torch.long)
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` (``[n, H, D]``, the pages' dtype) of layer ``layer`` at ``slot_mapping`` (-1 skips)."""
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"K/V dtype {k.dtype}/{v.dtype} differs from the pages' {self.dtype}; kvfast never "
                            "converts KV silently")
        # Slots may come from the host; the GPU kernels (unlike torch indexing) need them on the pages' device.
        self._kernels().scatter_kv(k, v, self.keys[layer], self.values[layer], slot_mapping.to(self.device),
                                   layout=self.layout)

    def gather(self, layer: int, block_table: Sequence[int] | torch.Tensor, num_tokens: int,
               start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies of K and V of layer ``layer`` at positions ``[start, num_tokens)`` of a sequence over
        ``block_table``, each ``[num_tokens - start, H, D]``.

        Host pages go through the native gather when it is built (one thread, GIL released, any strides: the
        mirror of a load's scatter); a torch copy out of strided views such as vLLM CPU's transposed K spreads
        over torch's threads and runs an element at a time.
        """
        if native is not None and self.device.type == "cpu" and num_tokens > 0:
            table = self.check_block_ids(block_table, num_tokens)
            out = []
            for pages in (self.keys[layer], self.values[layer]):
                rows = torch.empty(num_tokens, self.num_kv_heads, self.head_dim, dtype=self.dtype)
                native.gather_pages(self.byte_view(pages), table, num_tokens, rows.view(torch.uint8).numpy())
                out.append(rows)
            k, v = out
        else:
            table = torch.as_tensor(block_table, dtype=torch.long, device=self.device)
            k, v = self._kernels().gather_kv(self.keys[layer], self.values[layer], table, num_tokens,
                                             layout=self.layout)
        return k[start:], v[start:]

    def byte_view(self, pages: torch.Tensor) -> np.ndarray:
        """One layer's K or V ``pages`` (host memory) as the uint8 ``[num_blocks, block_size, H, D, itemsize]``
        array the native routines take, at the pages' strides in bytes (``D`` may be strided: vLLM CPU's K);
        shares memory with the pages."""
        t = self.token_major(pages)
        item = t.element_size()
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        view = raw.as_strided((*t.shape, item), (*(s * item for s in t.stride()), 1), t.storage_offset() * item)
        return view.numpy()

    def _kernels(self) -> Any:
        # CPU pages stay on the PyTorch reference; CUDA pages use the GPU kernels kvfast._backend picks.
        return ops if self.device.type != "cuda" else paged_kernels(self.device)[1]

    def __repr__(self) -> str:
        return (f"KVPages(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"blocks={self.num_blocks}x{self.block_size}, dtype={self.dtype}, layout={self.layout}, "
                f"device={self.device})")
