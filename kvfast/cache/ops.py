"""Reference implementations of the paged-cache kernels: slow, clear, exact.

They are the test oracle for the Triton and CUDA kernels and the path used on the CPU. Layouts
(kvfast/cache/pages.py), per layer:

    NHD  [num_blocks, block_size, num_kv_heads, head_dim]   vLLM's FlashAttention backend
    HND  [num_blocks, num_kv_heads, block_size, head_dim]   FlashInfer's other layout
"""
from __future__ import annotations

import torch

LAYOUTS = ("NHD", "HND")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def scatter_kv(src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor, *, layout: str = "NHD") -> None:
    """Write tokens into paged K/V caches, as vLLM's ``reshape_and_cache_flash`` does.

    Args:
        src_k, src_v: ``[num_tokens, num_kv_heads, head_dim]``.
        k_cache, v_cache: one layer's cache in ``layout`` (any strides).
        slot_mapping: ``[num_tokens]`` int, ``block_id * block_size + offset``; ``-1`` skips the token
            (padding in a batch), so it is filtered before any index arithmetic.

    Example:
        >>> kc = torch.zeros(4, 16, 2, 8); vc = torch.zeros_like(kc)
        >>> k = torch.randn(3, 2, 8)
        >>> scatter_kv(k, k, kc, vc, torch.tensor([17, -1, 0]))
        >>> torch.equal(kc[1, 1], k[0]) and torch.equal(kc[0, 0], k[2])
        True
    """
    check_layout(layout)
    block_size = k_cache.shape[1] if layout == "NHD" else k_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.long)
    block_idx, block_offset = slots // block_size, slots % block_size
    for src, cache in ((src_k, k_cache), (src_v, v_cache)):
        if layout == "NHD":
            cache[block_idx, block_offset] = src[keep]
        else:
            cache[block_idx, :, block_offset] = src[keep]


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, *,
              layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's first ``num_tokens`` tokens out of paged caches.

    Args:
        k_cache, v_cache: one layer's cache in ``layout``.
        block_table: ``[>= ceil(num_tokens / block_size)]`` int, the sequence's blocks in order.

    Returns:
        K and V, each a new contiguous ``[num_tokens, num_kv_heads, head_dim]`` tensor.
    """
    check_layout(layout)
    block_size = k_cache.shape[1] if layout == "NHD" else k_cache.shape[2]
    blocks = block_table[: -(-num_tokens // block_size)].to(torch.long)
    out = []
    for cache in (k_cache, v_cache):
        paged = cache[blocks]  # [nb, bs, H, D] or [nb, H, bs, D]
        if layout == "HND":
            paged = paged.transpose(1, 2)
        out.append(paged.reshape(-1, *paged.shape[2:])[:num_tokens].contiguous())
    return out[0], out[1]


def scatter_kv_layers(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      layout: str = "NHD") -> None:
    """Write a chunk of tokens for several layers at once: :func:`scatter_kv` once per layer.

    For a buffer holding ``[layers, K/V, tokens, H, D]`` (one token range of several layers) whose every layer's
    tokens go to the same slots. kvfast's loaders scatter chunk by chunk (one layer each, layer-major, so layers
    complete in order); bench/bench_kernels.py measures this one-launch form against them.

    Args:
        src: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``; ``src[:, 0]`` is K, ``src[:, 1]`` is V.
        cache: ``[num_layers, 2, num_blocks, *page]`` with ``page`` in ``layout`` (any strides), e.g.
            ``PagedKVCache.storage`` or a slice of its layers; other stacks are views of this shape
            (kv-first ``[2, L, ...]``: ``.transpose(0, 1)``).
        slot_mapping: ``[num_tokens]`` int, as in :func:`scatter_kv`; ``-1`` skips the token in every layer.

    Example:
        >>> storage = torch.zeros(3, 2, 4, 16, 2, 8)             # [L, 2, blocks, block_size, H, D]
        >>> src = torch.randn(3, 2, 5, 2, 8)
        >>> scatter_kv_layers(src, storage, torch.tensor([0, 1, 2, -1, 40]))
        >>> torch.equal(storage[2, 1, 2, 8], src[2, 1, 4])
        True
    """
    check_layout(layout)
    if src.dim() != 5 or src.shape[1] != 2 or cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"src must be [L, 2, T, H, D] and cache [L, 2, num_blocks, *page]; got {tuple(src.shape)} "
                         f"and {tuple(cache.shape)}")
    if src.shape[0] != cache.shape[0]:
        raise ValueError(f"src has {src.shape[0]} layers but cache {cache.shape[0]}; slice the cache's layers")
    for layer in range(src.shape[0]):
        scatter_kv(src[layer, 0], src[layer, 1], cache[layer, 0], cache[layer, 1], slot_mapping, layout=layout)
