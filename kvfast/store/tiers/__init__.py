"""The store's tiers, fastest first, one file each behind one small interface (:class:`Tier`):

    device.py   documents resident in a paged cache: one root sequence per (cache, document); agents fork it
    ram.py      documents in host memory, as the pages of the cache they were evicted from
    disk.py     the root folder: .kvf files and their sidecars, the source of truth
    origin.py   an S3-compatible object store shared by every node, below disk (Store(origin=...))
"""
from __future__ import annotations

from typing import Protocol

from kvfast.store.entry import StoreKey


class Tier(Protocol):
    """What the store asks of every tier."""

    name: str  # "device", "ram", "disk" or "origin": the key of StoreStats.hits, bytes_read and evictions

    def holds(self, key: StoreKey) -> bool:
        """Whether this tier has the document now."""

    def forget(self, key: StoreKey) -> None:
        """Drop the document from this tier (it was removed, or found corrupt)."""

    def used(self) -> int:
        """How much of the tier's budget is in use, in the budget's unit (bytes, or blocks per cache)."""
