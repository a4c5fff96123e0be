"""A ``transformers`` Cache over one sequence of the paged cache.

:class:`PagedCache` makes any decoder-only model of ``transformers`` (Llama, Qwen2/3, Mistral...) attend
over a :class:`PagedKVCache` sequence, so ``model(...)`` and ``model.generate(...)`` continue from a loaded
document. It hands attention the same contiguous ``[1, H, S, D]`` tensors a ``DynamicCache`` would, so the
arithmetic, and hence every logit, is bitwise the same as continuing from an in-memory prefill.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvfast.cache.paged import KVSequence, PagedKVCache


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
        draft tokens (:meth:`PagedKVCache.truncate`)."""
        length = self.seq.num_tokens
        keep = length - min(-tokens_to_remove, length) if tokens_to_remove <= 0 else min(tokens_to_remove, length)
        self.cache.truncate(self.seq, keep)
        self.lengths = [keep] * len(self.lengths)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Batch size 1 only: the identity order is accepted, any other (beam search) is refused."""
        if beam_idx.tolist() != [0]:
            raise NotImplementedError("PagedCache serves batch size 1: beam search (num_beams > 1) is not "
                                      "supported; use num_beams=1")
