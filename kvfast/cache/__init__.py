"""The paged KV cache: fixed-size pages per layer, sequences over them, and the reference scatter/gather."""
from kvfast.cache.paged import BlockAllocator, KVSequence, PagedKVCache

__all__ = ["BlockAllocator", "KVSequence", "PagedKVCache"]
