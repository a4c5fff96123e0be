"""The provider-side store: documents' KV keyed by model fingerprint and block-hash chain, served through tiers."""
from kvfast.store.store import Store, StoreEntry, StoreKey, StoreMatch, StoreStats

__all__ = ["Store", "StoreEntry", "StoreKey", "StoreMatch", "StoreStats"]
