"""Prefill with a transformers model: capture a document's KV, publish it as a .kvf file, or extend a paged
sequence with more tokens (the rest of a prompt past a loaded prefix)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from kvfast.errors import InvalidArgumentError
from kvfast.identity import fingerprint as model_fingerprint
from kvfast.identity import model_config
from kvfast.format import save_kv
from kvfast.cache.paged import KVSequence, PagedKVCache
from kvfast.hf.cache import PagedCache

DEFAULT_PREFILL_CHUNK = 512  # tokens per forward: bounds activation memory for long documents


def model_token_tensor(model: Any, token_ids: Sequence[int] | torch.Tensor, *, start: int = 0,
                       path: str | os.PathLike | None = None) -> torch.Tensor:
    """``token_ids`` as a tensor on the model's device, refused unless the model can take them at positions
    ``start...``: an id outside the embedding table would fail deep inside the forward (``IndexError: index out
    of range in self``), and positions past the model's limit give KV it was never trained for."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise InvalidArgumentError("token_ids is empty; give at least one token id", path=path)
    vocab = model.get_input_embeddings().num_embeddings
    bad = ((ids < 0) | (ids >= vocab)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise InvalidArgumentError(f"token id {int(ids[i])} at position {i} is not in the model's vocabulary "
                                   f"(allowed: 0..{vocab - 1})", path=path)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and start + ids.numel() > limit:
        raise InvalidArgumentError(f"{start} + {ids.numel()} tokens exceed the model's position limit "
                                   f"(max_position_embeddings={limit}); shorten the document", path=path)
    return ids.to(model.device)


def _check_prefill_chunk(prefill_chunk: int) -> None:
    if prefill_chunk < 1:
        raise InvalidArgumentError(f"prefill_chunk={prefill_chunk}; use a positive number of tokens per forward")


@torch.no_grad()
def prefill(model: Any, token_ids: Sequence[int] | torch.Tensor, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
            progress: bool = False) -> DynamicCache:
    """Run the model over a document, ``prefill_chunk`` tokens per forward, and return its ``DynamicCache``.

    The cache uses full-attention layers even for sliding-window models, so no document token is dropped.
    """
    _check_prefill_chunk(prefill_chunk)
    ids = model_token_tensor(model, token_ids)
    past = DynamicCache()
    for a in tqdm(range(0, ids.numel(), prefill_chunk), desc="prefill", unit="chunk", disable=not progress):
        model(input_ids=ids[None, a : a + prefill_chunk], past_key_values=past, use_cache=True, logits_to_keep=1)
    return past


def kv_from_cache(past: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V of batch row 0 of a ``DynamicCache``, each ``[num_tokens, H, D]`` (contiguous)."""
    keys = [layer.keys[0].transpose(0, 1).contiguous() for layer in past.layers]
    values = [layer.values[0].transpose(0, 1).contiguous() for layer in past.layers]
    return keys, values


def capture_kv(model: Any, token_ids: Sequence[int] | torch.Tensor, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
               progress: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill a document and return its per-layer K and V, each ``[num_tokens, num_kv_heads, head_dim]``."""
    return kv_from_cache(prefill(model, token_ids, prefill_chunk=prefill_chunk, progress=progress))


def publish(model: Any, token_ids: Sequence[int] | torch.Tensor, path: str | os.PathLike, *,
            prefill_chunk: int = DEFAULT_PREFILL_CHUNK, progress: bool = False, **save_kv_options: Any) -> Path:
    """Prefill ``token_ids`` with ``model`` and save the KV as a .kvf file (see :func:`kvfast.save_kv`).

    Example:
        >>> kvfast.publish(model, tokenizer(doc).input_ids, "doc.kvf")  # doctest: +SKIP
    """
    model_token_tensor(model, token_ids, path=path)  # refused naming the file, before any prefill
    keys, values = capture_kv(model, token_ids, prefill_chunk=prefill_chunk, progress=progress)
    save_kv_options.setdefault("model_config", model_config(model))
    meta = dict(save_kv_options.pop("metadata", None) or {})
    meta.setdefault("prefill_chunk", str(prefill_chunk))
    meta.setdefault("attn_implementation", str(getattr(model.config, "_attn_implementation", None)))
    return save_kv(path, keys, values, token_ids, fingerprint=model_fingerprint(model), metadata=meta,
                   **save_kv_options)


@torch.no_grad()
def extend(model: Any, cache: PagedKVCache, seq: KVSequence, token_ids: Sequence[int] | torch.Tensor, *,
           prefill_chunk: int = DEFAULT_PREFILL_CHUNK, progress: bool = False) -> torch.Tensor:
    """Prefill ``token_ids`` after what ``seq`` holds (e.g. the rest of a prompt past a loaded prefix).

    Returns the logits after the last token, ``[vocab]``; ``seq`` grows by ``len(token_ids)``.
    """
    _check_prefill_chunk(prefill_chunk)
    ids = model_token_tensor(model, token_ids, start=seq.num_tokens)
    past = PagedCache(cache, seq)
    for a in tqdm(range(0, ids.numel(), prefill_chunk), desc="prefill", unit="chunk", disable=not progress):
        logits = model(input_ids=ids[None, a : a + prefill_chunk], past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits
    return logits[0, -1]
