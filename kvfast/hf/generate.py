"""The reference generation loop: greedy or seeded sampling over a paged-cache sequence.

One loop serves every cache (``PagedCache`` for loaded documents, ``DynamicCache`` for the in-memory and
scratch baselines that ``kvfast verify`` compares against), so a comparison measures the KV, not the loop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from kvfast.hf.cache import PagedCache
from kvfast.hf.capture import model_token_tensor
from kvfast.cache.paged import KVSequence, PagedKVCache


@dataclass
class GenerationOutput:
    """What :func:`generate` produced.

    Attributes:
        tokens: the new token ids, at most ``max_new_tokens``.
        logits: ``[len(tokens), vocab]`` float32, the logits each token was picked from (or None).
    """

    tokens: list[int]
    logits: torch.Tensor | None


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: torch.Generator | None) -> int:
    if not do_sample:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
        probs[order[drop]] = 0.0
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(model: Any, past: Cache, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int = 32,
           do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           seed: int | None = None, eos_token_id: int | None = None,
           return_logits: bool = True, progress: bool = False) -> GenerationOutput:
    """Feed ``prompt_ids`` after what ``past`` holds, then generate; the loop behind :func:`generate`."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if do_sample and temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = model_token_tensor(model, prompt_ids, start=past.get_seq_length())[None]
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    for step in tqdm(range(max_new_tokens), desc="generate", unit="token", disable=not progress):
        # logits_to_keep=1 on every path, so the lm_head matmul has the same shape everywhere
        logits = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1).logits[0, -1]
        token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
        tokens.append(token)
        if return_logits:
            rows.append(logits.float().cpu())
        if token == eos_token_id:
            break
        ids = torch.tensor([[token]], device=model.device)
    return GenerationOutput(tokens, torch.stack(rows) if rows else None)


def generate(model: Any, cache: PagedKVCache, seq: KVSequence, prompt_ids: Sequence[int] | torch.Tensor, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = None,
             return_logits: bool = True, progress: bool = False) -> GenerationOutput:
    """Continue ``seq`` (e.g. a loaded document) with ``prompt_ids`` and generate up to ``max_new_tokens``.

    ``seq`` grows by the prompt and the generated tokens (all but the last, which was never fed back).
    To keep a shared document untouched, pass ``cache.fork(seq)``: shared blocks are copied on write.

    Args:
        model: a ``transformers`` causal LM whose fingerprint matches the KV in ``seq``.
        cache, seq: the paged cache and the sequence to continue.
        prompt_ids: at least one token (the question).
        do_sample: greedy when False; otherwise sample with ``temperature``, ``top_k``, ``top_p`` and a
            ``seed`` (same seed, same tokens).
        eos_token_id: stop after generating it.
        return_logits: keep each step's logits.
        progress: show a progress bar of the new tokens (on stderr).

    Example:
        >>> seq = kvfast.load("doc.kvf", cache, model=model)                              # doctest: +SKIP
        >>> out = kvfast.generate(model, cache, cache.fork(seq), question_ids, max_new_tokens=32)  # doctest: +SKIP
        >>> out.tokens[:3]                                                                # doctest: +SKIP
    """
    return decode(model, PagedCache(cache, seq), prompt_ids, max_new_tokens=max_new_tokens,
                  do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  eos_token_id=eos_token_id, return_logits=return_logits, progress=progress)
