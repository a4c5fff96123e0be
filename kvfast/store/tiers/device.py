"""The device tier: documents resident in paged caches. One root sequence per (cache, document); agents get
``cache.fork(root, n)``, so N agents hold the document once. A root that any agent still shares (a block with a
reference count above one) is in use and never evicted; unused roots go least recently used first, to the RAM
tier when it has room."""
from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from kvfast.cache.paged import KVSequence, PagedKVCache
from kvfast.store.entry import StoreKey
from kvfast.store.tiers.ram import RamEntry, RamTier


@dataclass
class Root:
    """A document resident in a paged cache; agents are forks of ``seq``."""

    seq: KVSequence
    token_ids: np.ndarray  # [num_tokens] int64, checked against every attached prompt
    num_tokens: int
    nbytes: int


@dataclass
class _Roots:
    roots: OrderedDict[StoreKey, Root] = field(default_factory=OrderedDict)  # least recently used first
    blocks: int = 0


class DeviceTier:
    """Roots in every paged cache this store served, under ``budget`` blocks per cache.

    Args:
        budget: blocks per cache the resident documents may hold (None: up to the cache's capacity; unused
            documents are evicted when the cache runs short).
        ram: where an evicted root's pages go, when they fit.
    """

    name = "device"

    def __init__(self, budget: int | None, ram: RamTier):
        self.budget, self._ram = budget, ram
        self._caches: weakref.WeakKeyDictionary[PagedKVCache, _Roots] = weakref.WeakKeyDictionary()
        self.evictions = 0

    def get(self, cache: PagedKVCache, key: StoreKey) -> Root | None:
        """The document's root in ``cache`` (marked most recently used), or None."""
        tier = self._caches.get(cache)
        if tier is None or key not in tier.roots:
            return None
        tier.roots.move_to_end(key)
        return tier.roots[key]

    def holds(self, key: StoreKey, cache: PagedKVCache | None = None) -> bool:
        caches = [cache] if cache is not None else list(self._caches)
        return any(key in self._caches[c].roots for c in caches if c in self._caches)

    def adopt(self, cache: PagedKVCache, key: StoreKey, root: Root) -> bool:
        """Keep ``root`` resident if it fits the budget; False means the caller owns it alone."""
        tier = self._caches.setdefault(cache, _Roots())
        if self.budget is not None and tier.blocks + len(root.seq.block_table) > self.budget:
            return False
        tier.roots[key] = root
        tier.blocks += len(root.seq.block_table)
        return True

    def make_room(self, cache: PagedKVCache, need: int) -> None:
        """Evict unused roots, least recently used first, until ``need`` blocks fit the budget and the cache."""
        tier = self._caches.setdefault(cache, _Roots())
        for key in list(tier.roots):
            over_budget = self.budget is not None and tier.blocks + need > self.budget
            if not over_budget and cache.num_free_blocks >= need:
                return
            if not self._in_use(cache, tier.roots[key]):
                self._evict(cache, tier, key)

    def evict(self, cache: PagedKVCache | None = None) -> int:
        """Free every root no agent shares (of ``cache``, or of all caches); returns the blocks freed."""
        freed = 0
        for c in [cache] if cache is not None else list(self._caches):
            tier = self._caches.get(c)
            for key in list(tier.roots) if tier else []:
                if not self._in_use(c, tier.roots[key]):
                    freed += len(tier.roots[key].seq.block_table)
                    self._evict(c, tier, key)
        return freed

    def in_use(self, key: StoreKey) -> bool:
        """Whether any agent shares the document's blocks in any cache."""
        return any(key in t.roots and self._in_use(c, t.roots[key]) for c, t in list(self._caches.items()))

    def forget(self, key: StoreKey) -> None:
        for cache, tier in list(self._caches.items()):
            root = tier.roots.pop(key, None)
            if root is not None:
                tier.blocks -= len(root.seq.block_table)
                cache.free(root.seq)

    def clear(self) -> None:
        """Free every root; agents' sequences stay valid (they hold their blocks)."""
        for cache, tier in list(self._caches.items()):
            for root in tier.roots.values():
                cache.free(root.seq)
            tier.roots.clear()
            tier.blocks = 0

    def used(self, cache: PagedKVCache | None = None) -> int:
        """Blocks held by resident documents (of ``cache``, or of all caches)."""
        return sum(t.blocks for c, t in list(self._caches.items()) if cache is None or c is cache)

    def totals(self) -> tuple[int, int, int]:
        """(documents, blocks, bytes) resident over all caches."""
        tiers = list(self._caches.values())
        return (sum(len(t.roots) for t in tiers), sum(t.blocks for t in tiers),
                sum(r.nbytes for t in tiers for r in t.roots.values()))

    @staticmethod
    def _in_use(cache: PagedKVCache, root: Root) -> bool:
        return bool((cache.allocator.refcount[root.seq.block_table] > 1).any())

    def _evict(self, cache: PagedKVCache, tier: _Roots, key: StoreKey) -> None:
        """Free a root's blocks; keep a host copy in the RAM tier (if it has none yet) when it fits there."""
        root = tier.roots.pop(key)
        tier.blocks -= len(root.seq.block_table)
        blocks = root.seq.block_table
        page_shape = cache.storage.shape[3:]
        nbytes = cache.num_layers * 2 * len(blocks) * math.prod(page_shape) * cache.storage.element_size()
        if self._ram.get(key) is None and nbytes <= self._ram.budget:
            pages = torch.empty(cache.num_layers, 2, len(blocks), *page_shape, dtype=cache.dtype,
                                pin_memory=torch.cuda.is_available())
            index = torch.tensor(blocks, dtype=torch.long, device=cache.device)
            for layer in range(cache.num_layers):  # one layer at a time bounds the device-side temporary
                pages[layer].copy_(cache.storage[layer].index_select(1, index))
            self._ram.put(key, RamEntry(pages, cache.layout, root.num_tokens, root.token_ids))
        cache.free(root.seq)
        self.evictions += 1
