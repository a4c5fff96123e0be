"""The paged KV cache: fixed-size pages per layer, sequences over them, and the reference scatter/gather."""
from kvfast.cache.pages import KVPages
from kvfast.cache.paged import BlockAllocator, KVSequence, PagedKVCache

__all__ = ["BlockAllocator", "KVPages", "KVSequence", "PagedKVCache"]
