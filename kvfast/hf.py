"""transformers integration: capture a document's KV from prefill, and a ``Cache`` over the paged cache.

:class:`PagedCache` makes any decoder-only model of ``transformers`` (Llama, Qwen2/3, Mistral...) attend
over a :class:`PagedKVCache` sequence, so ``model(...)`` and ``model.generate(...)`` continue from a loaded
document. It hands attention the same contiguous ``[1, H, S, D]`` tensors a ``DynamicCache`` would, so the
arithmetic, and hence every logit, is bitwise the same as continuing from an in-memory prefill.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from kvfast.errors import InvalidArgumentError
from kvfast.fingerprint import fingerprint as model_fingerprint
from kvfast.fingerprint import model_config
from kvfast.format import save_kv
from kvfast.paged import KVSequence, PagedKVCache

DEFAULT_PREFILL_CHUNK = 512  # tokens per forward: bounds activation memory for long documents


def _model_token_tensor(model: Any, token_ids: Sequence[int] | torch.Tensor, *, start: int = 0,
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


@torch.no_grad()
def prefill(model: Any, token_ids: Sequence[int] | torch.Tensor, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
            progress: bool = False) -> DynamicCache:
    """Run the model over a document, ``prefill_chunk`` tokens per forward, and return its ``DynamicCache``.

    The cache uses full-attention layers even for sliding-window models, so no document token is dropped.
    """
    if prefill_chunk < 1:
        raise InvalidArgumentError(f"prefill_chunk={prefill_chunk}; use a positive number of tokens per forward")
    ids = _model_token_tensor(model, token_ids)
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
    _model_token_tensor(model, token_ids, path=path)  # refused naming the file, before any prefill
    keys, values = capture_kv(model, token_ids, prefill_chunk=prefill_chunk, progress=progress)
    save_kv_options.setdefault("model_config", model_config(model))
    meta = dict(save_kv_options.pop("metadata", None) or {})
    meta.setdefault("prefill_chunk", str(prefill_chunk))
    meta.setdefault("attn_implementation", str(getattr(model.config, "_attn_implementation", None)))
    return save_kv(path, keys, values, token_ids, fingerprint=model_fingerprint(model), metadata=meta,
                   **save_kv_options)


class _PagedLayer(CacheLayerMixin):
    """One layer of a :class:`PagedCache`; all state lives in the owner."""

    is_sliding = False  # every layer keeps all tokens; sliding-window models get their window from the mask
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: PagedCache, layer: int):
        super().__init__()
        self.owner, self.layer = owner, layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner._update(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.lengths[self.layer]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("free the sequence with PagedKVCache.free instead")


class PagedCache(Cache):
    """A ``transformers`` Cache over one sequence of a :class:`PagedKVCache` (batch size 1).

    New tokens are written into the sequence's blocks (growing it, copy on write for shared blocks), and
    attention reads the whole sequence back from its pages.

    Example:
        >>> seq = kvfast.load("doc.kvf", cache, model=model)                      # doctest: +SKIP
        >>> out = model.generate(torch.tensor([doc_ids + question_ids]),          # doctest: +SKIP
        ...                      past_key_values=PagedCache(cache, cache.fork(seq)), max_new_tokens=32)
    """

    def __init__(self, cache: PagedKVCache, seq: KVSequence):
        super().__init__(layers=[_PagedLayer(self, layer) for layer in range(cache.num_layers)])
        self.cache, self.seq = cache, seq
        # Tokens written per layer: layer l of a forward step runs after layer l-1 has grown the sequence.
        self.lengths = [seq.num_tokens] * cache.num_layers

    def _update(self, layer: int, key_states: torch.Tensor,
                value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != 1:
            raise ValueError(f"PagedCache serves batch size 1, got {key_states.shape[0]}")
        start, q = self.lengths[layer], key_states.shape[2]
        if start + q > self.seq.num_tokens:
            self.cache.append_slots(self.seq, start + q - self.seq.num_tokens)
        slots = self.cache.slot_mapping(self.seq, start, start + q)
        # [1, H, q, D] -> [q, H, D]
        self.cache.write(layer, slots, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        self.lengths[layer] = start + q
        k, v = self.cache.gather(self.seq, layer, 0, start + q)
        # [S, H, D] -> contiguous [1, H, S, D], the exact tensor DynamicCache would hand attention
        return k.transpose(0, 1).contiguous()[None], v.transpose(0, 1).contiguous()[None]

    def crop(self, tokens_to_remove: int) -> None:
        """Truncate the sequence (``transformers``' convention: a negative value removes that many tokens, a
        positive one is the length to keep); used by prompt-lookup and assisted decoding to drop rejected
        draft tokens. Whole blocks past the new end are released; a kept, partly filled block that another
        sequence shares is copied before the next write (copy on write), so the other sequence is untouched."""
        length = self.seq.num_tokens
        keep = length - min(-tokens_to_remove, length) if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        blocks = self.cache.blocks_for(keep)
        self.cache.allocator.decref(self.seq.block_table[blocks:])
        del self.seq.block_table[blocks:]
        self.seq.num_tokens = keep
        self.lengths = [keep] * len(self.lengths)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Batch size 1 only: the identity order is accepted, any other (beam search) is refused."""
        if beam_idx.tolist() != [0]:
            raise NotImplementedError("PagedCache serves batch size 1: beam search (num_beams > 1) is not "
                                      "supported; use num_beams=1")


@torch.no_grad()
def extend(model: Any, cache: PagedKVCache, seq: KVSequence, token_ids: Sequence[int] | torch.Tensor, *,
           prefill_chunk: int = DEFAULT_PREFILL_CHUNK, progress: bool = False) -> torch.Tensor:
    """Prefill ``token_ids`` after what ``seq`` holds (e.g. the rest of a prompt past a loaded prefix).

    Returns the logits after the last token, ``[vocab]``; ``seq`` grows by ``len(token_ids)``.
    """
    if prefill_chunk < 1:
        raise InvalidArgumentError(f"prefill_chunk={prefill_chunk}; use a positive number of tokens per forward")
    ids = _model_token_tensor(model, token_ids, start=seq.num_tokens)
    past = PagedCache(cache, seq)
    for a in tqdm(range(0, ids.numel(), prefill_chunk), desc="prefill", unit="chunk", disable=not progress):
        logits = model(input_ids=ids[None, a : a + prefill_chunk], past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits
    return logits[0, -1]
