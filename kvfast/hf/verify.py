"""End-to-end exactness check of a .kvf file against the model that should have made it.

Three continuations of the same question are compared:
    loaded   the file loaded into a paged cache, continued with the reference loop;
    prefill  a fresh in-memory prefill of the document (same chunking as publish), then the same loop;
    scratch  one forward over document + question from an empty cache, then the same loop.
loaded and prefill must agree bit for bit (the promise kvfast makes); scratch may differ by the model's own
rounding (other matmul shapes), so it is reported, not required.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from kvfast.format import open_kvf
from kvfast.hf.generate import GenerationOutput, decode, generate
from kvfast.hf.capture import DEFAULT_PREFILL_CHUNK, kv_from_cache, prefill
from kvfast.loader import load
from kvfast.cache.paged import PagedKVCache


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`. ``ok`` is what ``kvfast verify`` exits with."""

    path: str
    doc_tokens: int
    prompt_tokens: int
    new_tokens: int
    kv_bitwise_equal: bool
    prefill_tokens_matched: int
    prefill_max_logit_diff: float
    scratch_tokens_matched: int
    scratch_max_logit_diff: float
    prefill_seconds: float
    load_seconds: float

    @property
    def ok(self) -> bool:
        return (self.kv_bitwise_equal and self.prefill_tokens_matched == self.new_tokens
                and self.prefill_max_logit_diff == 0.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _agreement(a: GenerationOutput, b: GenerationOutput) -> tuple[int, float]:
    """Greedy tokens matched before the first divergence, and max |logit diff| over those steps."""
    n = 0
    while n < min(len(a.tokens), len(b.tokens)) and a.tokens[n] == b.tokens[n]:
        n += 1
    steps = min(len(a.tokens), len(b.tokens))
    diff = (a.logits[:steps] - b.logits[:steps]).abs().max().item() if steps else 0.0
    return n, diff


def verify(model: Any, path: str | os.PathLike, prompt_ids: Sequence[int], *, max_new_tokens: int = 32,
           block_size: int = 16, layout: str = "NHD", progress: bool = False) -> VerifyReport:
    """Load ``path`` for ``model`` and compare it and its continuation against fresh prefills.

    ``progress`` shows a progress bar for each prefill and generation (on stderr).

    Raises whatever :func:`kvfast.load` raises for a file that cannot be attached to ``model``.
    """
    with open_kvf(path) as reader:
        doc = reader.token_ids.tolist()
        chunk = int(reader.manifest.metadata.get("prefill_chunk", DEFAULT_PREFILL_CHUNK))
        cache = PagedKVCache.for_model(model, num_blocks=2 * -(-(len(doc) + len(prompt_ids) + max_new_tokens)
                                                            // block_size) + 2,
                                       block_size=block_size, layout=layout)
        t0 = time.perf_counter()
        seq = load(reader, cache, model=model)
        load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    past = prefill(model, doc, prefill_chunk=chunk, progress=progress)
    prefill_s = time.perf_counter() - t0
    keys, values = kv_from_cache(past)
    kv_equal = all(
        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for layer in range(cache.num_layers)
        for a, b in zip(cache.gather(seq, layer), (keys[layer], values[layer]))
    )
    loaded = generate(model, cache, seq, prompt_ids, max_new_tokens=max_new_tokens, progress=progress)
    fresh = decode(model, past, prompt_ids, max_new_tokens=max_new_tokens, progress=progress)
    scratch = decode(model, DynamicCache(), doc + list(prompt_ids), max_new_tokens=max_new_tokens,
                     progress=progress)
    p_tok, p_diff = _agreement(loaded, fresh)
    s_tok, s_diff = _agreement(loaded, scratch)
    return VerifyReport(str(path), len(doc), len(prompt_ids), len(loaded.tokens), kv_equal, p_tok, p_diff,
                        s_tok, s_diff, prefill_s, load_s)
