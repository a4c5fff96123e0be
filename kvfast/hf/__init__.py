"""transformers integration: prefill capture and publish, a Cache over the paged cache, generation, verification."""
from kvfast.hf.cache import PagedCache
from kvfast.hf.capture import DEFAULT_PREFILL_CHUNK, capture_kv, extend, kv_from_cache, prefill, publish
from kvfast.hf.generate import GenerationOutput, generate
from kvfast.hf.verify import VerifyReport, verify

__all__ = ["DEFAULT_PREFILL_CHUNK", "GenerationOutput", "PagedCache", "VerifyReport", "capture_kv", "extend",
           "generate", "kv_from_cache", "prefill", "publish", "verify"]
