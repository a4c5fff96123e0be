"""The host RAM tier: documents kept in this process's memory as the pages of the cache they were evicted from,
so one copy puts them back; least recently used first out, under a byte budget."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from kvfast.cache.pages import KVPages
from kvfast.cache.paged import KVSequence, PagedKVCache
from kvfast.format import open_kvf
from kvfast.loader import load_into
from kvfast.store.entry import StoreEntry, StoreKey


@dataclass
class RamEntry:
    """A document in host memory, as the pages of the cache it was evicted from (so it goes back in one copy)."""

    pages: torch.Tensor  # [num_layers, 2, num_blocks, *page], page as in `layout`; pinned when CUDA is present
    layout: str  # "NHD": page = [block_size, H, D]; "HND": page = [H, block_size, D]
    num_tokens: int
    token_ids: np.ndarray  # [num_tokens] int64

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    @property
    def block_size(self) -> int:
        return self.pages.shape[3] if self.layout == "NHD" else self.pages.shape[4]

    def tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[num_tokens, H, D]`` (views when the layout is NHD)."""
        kv = self.pages[layer] if self.layout == "NHD" else self.pages[layer].transpose(2, 3)
        kv = kv.reshape(2, -1, *kv.shape[-2:])[:, : self.num_tokens]  # [2, num_tokens, H, D]
        return kv[0], kv[1]


class RamTier:
    """Documents in host RAM under ``budget`` bytes, least recently used first out.

    Args:
        budget: bytes of KV kept; a document larger than the budget is never kept.
    """

    name = "ram"

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[StoreKey, RamEntry] = OrderedDict()  # least recently used first
        self._used = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, key: StoreKey) -> bool:
        return key in self._entries

    def used(self) -> int:
        return self._used

    def get(self, key: StoreKey) -> RamEntry | None:
        """The document's pages (marked most recently used), or None."""
        ram = self._entries.get(key)
        if ram is not None:
            self._entries.move_to_end(key)
        return ram

    def put(self, key: StoreKey, ram: RamEntry) -> None:
        """Keep ``ram``, evicting least recently used documents to make room; a no-op if it cannot fit."""
        if ram.nbytes > self.budget:
            return
        while self._used + ram.nbytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self._used -= old.nbytes
            self.evictions += 1
        self._entries[key] = ram
        self._used += ram.nbytes

    def forget(self, key: StoreKey) -> None:
        ram = self._entries.pop(key, None)
        if ram is not None:
            self._used -= ram.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0

    @staticmethod
    def _bytes(entry: StoreEntry, like: KVPages) -> int:
        """Bytes a copy of ``entry`` takes in whole pages shaped like ``like``."""
        return entry.kv_bytes // entry.num_tokens * like.blocks_for(entry.num_tokens) * like.block_size

    def fits(self, entry: StoreEntry, like: KVPages) -> bool:
        """Whether a copy of ``entry`` in pages shaped like ``like`` fits the budget."""
        return self._bytes(entry, like) <= self.budget

    def read(self, entry: StoreEntry, like: KVPages, verify: bool) -> RamEntry:
        """The whole document read from its file into host pages shaped like ``like``, and kept here."""
        nb = like.blocks_for(entry.num_tokens)
        page = (like.block_size, like.num_kv_heads, like.head_dim) if like.layout == "NHD" else \
            (like.num_kv_heads, like.block_size, like.head_dim)
        host = torch.empty(like.num_layers, 2, nb, *page, dtype=like.dtype, pin_memory=torch.cuda.is_available())
        with open_kvf(entry.path) as reader:
            load_into(reader, KVPages(list(host[:, 0]), list(host[:, 1]), layout=like.layout), np.arange(nb),
                      fingerprint=entry.key.fingerprint, verify=verify)
            ram = RamEntry(host, like.layout, entry.num_tokens, reader.token_ids.numpy())
        self.put(entry.key, ram)
        return ram

    @staticmethod
    def copy_into(ram: RamEntry, pages: KVPages, block_table: np.ndarray, num_tokens: int) -> None:
        """The document's first ``num_tokens`` tokens into blocks ``block_table`` of ``pages``: whole pages in one
        copy per layer when ``pages`` have the page shape it was evicted from, the rest token by token (so no
        slot past ``num_tokens`` is written)."""
        same = (ram.layout, ram.block_size) == (pages.layout, pages.block_size)
        full = num_tokens // pages.block_size if same else 0
        index = torch.as_tensor(block_table[:full], dtype=torch.long, device=pages.device)
        start = full * pages.block_size
        slots = pages.slot_mapping(block_table, start, num_tokens)
        for layer in range(pages.num_layers):
            if full:
                for kv, dst in ((0, pages.keys[layer]), (1, pages.values[layer])):
                    dst.index_copy_(0, index, ram.pages[layer, kv, :full].to(pages.device, non_blocking=True))
            if start < num_tokens:
                k, v = ram.tokens(layer)
                pages.write(layer, slots, k[start:num_tokens].to(pages.device, non_blocking=True),
                            v[start:num_tokens].to(pages.device, non_blocking=True))

    @classmethod
    def load(cls, ram: RamEntry, cache: PagedKVCache) -> KVSequence:
        """A new sequence of ``cache`` holding the whole document."""
        seq = cache.new_sequence()
        cache.append_slots(seq, ram.num_tokens)
        try:
            cls.copy_into(ram, cache.pages, np.asarray(seq.block_table, dtype=np.int64), ram.num_tokens)
        except BaseException:
            cache.free(seq)
            raise
        return seq
