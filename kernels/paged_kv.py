"""Triton kernels for the paged KV cache: scatter tokens into pages, gather a sequence back out.

Each kernel has a pure-PyTorch reference with the same signature in :mod:`kvfast.cache.ops`; the tests compare the
two bit for bit. Both kernels are plain copies driven by strides (see ``_checks.py``): one program copies one
token's ``[heads, head_dim]`` tile (or a slice of its heads) of K and of V, for one layer.

Written against triton 3.x's stable core (``tl.load``/``tl.store`` with masks, ``program_id``), so it runs
compiled on a GPU and, with ``TRITON_INTERPRET=1``, on CPU tensors.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kvfast.kernels import _checks

# Elements of one program's [BLOCK_H, BLOCK_D] tile: a full Qwen3/Llama token (8 heads x 128) in one program,
# 16 bytes per thread at 4 warps; wider tokens split their heads over grid axis 1.
_TILE_ELEMENTS = 2048
_NUM_WARPS = 4


# ===================================================================================================
# Scatter: [num_layers, num_tokens, H, D] source rows -> cache[layer, block_idx, block_offset / head]
# ===================================================================================================
@triton.jit
def _scatter_kv_kernel(
    src_k_ptr, src_v_ptr,  # [num_layers, num_tokens, num_heads, HEAD_DIM], strided
    k_cache_ptr, v_cache_ptr,  # [num_layers, num_blocks, *page], strided
    slot_mapping_ptr,  # [num_tokens], block_idx * block_size + block_offset, or -1
    num_heads, block_size,
    src_k_layer_stride, src_k_token_stride, src_k_head_stride,
    src_v_layer_stride, src_v_token_stride, src_v_head_stride,
    k_layer_stride, k_block_stride, k_page_stride, k_head_stride,
    v_layer_stride, v_block_stride, v_page_stride, v_head_stride,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 64-bit from the start: layer * layer_stride and block_idx * block_stride pass 2**31 on large caches.
    token_idx = tl.program_id(0).to(tl.int64)
    head_tile = tl.program_id(1)
    layer_idx = tl.program_id(2).to(tl.int64)

    slot_idx = tl.load(slot_mapping_ptr + token_idx).to(tl.int64)
    # Padding (-1) is handled first: such a token copies no heads at all, and clamping its slot keeps even the
    # masked-off addresses inside the cache instead of deriving a block index from -1.
    heads_to_copy = tl.where(slot_idx >= 0, num_heads, 0)
    slot_idx = tl.maximum(slot_idx, 0)
    block_idx = slot_idx // block_size
    block_offset = slot_idx % block_size

    # int64 too: head_idx * head_stride passes 2**31 in strided views (heads-major sources, heads-outer caches),
    # and a stride below 2**31 arrives as an i32 argument, so the product would wrap in 32 bits.
    head_idx = (head_tile * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]).to(tl.int64)  # [BLOCK_H, 1]
    dim_idx = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (head_idx < heads_to_copy) & (dim_idx < HEAD_DIM)

    src_k = (src_k_ptr + layer_idx * src_k_layer_stride + token_idx * src_k_token_stride
             + head_idx * src_k_head_stride + dim_idx)
    src_v = (src_v_ptr + layer_idx * src_v_layer_stride + token_idx * src_v_token_stride
             + head_idx * src_v_head_stride + dim_idx)
    k_dst = (k_cache_ptr + layer_idx * k_layer_stride + block_idx * k_block_stride + block_offset * k_page_stride
             + head_idx * k_head_stride + dim_idx)
    v_dst = (v_cache_ptr + layer_idx * v_layer_stride + block_idx * v_block_stride + block_offset * v_page_stride
             + head_idx * v_head_stride + dim_idx)
    tl.store(k_dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_dst, tl.load(src_v, mask=mask), mask=mask)


def _tile(num_heads: int, head_dim: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _TILE_ELEMENTS // block_d))
    return block_h, block_d


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current device and its stream: make that the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_scatter(plan: _checks.ScatterPlan) -> None:
    if plan.num_tokens == 0 or plan.num_layers == 0:
        return  # a zero-size grid is an error in some launchers, and there is nothing to do
    block_h, block_d = _tile(plan.num_heads, plan.head_dim)
    grid = (plan.num_tokens, triton.cdiv(plan.num_heads, block_h), plan.num_layers)
    with _on_device(plan.k_cache):
        _scatter_kv_kernel[grid](
            plan.src_k, plan.src_v, plan.k_cache, plan.v_cache, plan.slot_mapping,
            plan.num_heads, plan.block_size,
            *plan.src_k_strides, *plan.src_v_strides, *plan.k_cache_strides, *plan.v_cache_strides,
            HEAD_DIM=plan.head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )


def scatter_kv(src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor, *, layout: str = "NHD") -> None:
    """Write tokens into one layer's paged K/V caches (vLLM's ``reshape_and_cache_flash``), in Triton.

    Same contract as :func:`kvfast.cache.ops.scatter_kv`, bit for bit.

    Args:
        src_k, src_v: ``[num_tokens, num_kv_heads, head_dim]``, any strides with ``head_dim`` contiguous.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD) or ``[num_blocks, num_kv_heads,
            block_size, head_dim]`` (HND), same dtype as ``src_*``; any view whose last dimension is contiguous, e.g.
            the halves ``packed[..., :D]``, ``packed[..., D:]`` of vLLM's ``[num_blocks, H, block_size, 2 * D]`` pages
            (HND), or ``stack[0]``/``stack[:, 0]`` of kv-first / blocks-first stacks.
        slot_mapping: ``[num_tokens]`` int32/int64, ``block_idx * block_size + block_offset``; ``-1`` skips the token.
            Precondition (not checked, it would cost a device sync): every other slot is below ``num_blocks *
            block_size``.
        layout: one of {"NHD", "HND"}.

    Example:
        >>> k_cache = torch.zeros(4, 16, 2, 8, device="cuda"); v_cache = torch.zeros_like(k_cache)  # doctest: +SKIP
        >>> k = torch.randn(3, 2, 8, device="cuda")                                                 # doctest: +SKIP
        >>> scatter_kv(k, k, k_cache, v_cache, torch.tensor([17, -1, 0], device="cuda"))            # doctest: +SKIP
        >>> torch.equal(k_cache[1, 1], k[0])                                                         # doctest: +SKIP
        True
    """
    _launch_scatter(_checks.plan_scatter_one_layer(src_k, src_v, k_cache, v_cache, slot_mapping, layout))


def scatter_kv_layers(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      layout: str = "NHD") -> None:
    """Write one chunk of tokens for several layers in a single launch (a multi-layer staging buffer), in Triton.

    Same contract as :func:`kvfast.cache.ops.scatter_kv_layers`, bit for bit.

    Args:
        src: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``: per layer K then V, ``head_dim`` contiguous.
        cache: ``[num_layers, 2, num_blocks, *page]``, ``page`` in ``layout``: ``PagedKVCache.storage`` (or
            ``storage[first:last]``), or a view of that shape over another stack: kv-first ``[2, L, nb, *page]`` ->
            ``.transpose(0, 1)``; blocks-first ``[L, nb, 2, *page]`` -> ``.transpose(1, 2)``; vLLM's packed ``[L, nb,
            H, bs, 2 * D]`` -> ``.unflatten(-1, (2, D)).permute(0, 4, 1, 2, 3, 5)`` with HND.
        slot_mapping: ``[num_tokens]`` int32/int64, shared by every layer; ``-1`` skips the token.
        layout: one of {"NHD", "HND"}.

    Example:
        >>> cache = kvfast.PagedKVCache(36, 8, 128, num_blocks=512, device="cuda")   # doctest: +SKIP
        >>> staging = torch.empty(36, 2, 256, 8, 128, dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> scatter_kv_layers(staging, cache.storage, slots, layout=cache.layout)    # doctest: +SKIP
    """
    _launch_scatter(_checks.plan_scatter_layers(src, cache, slot_mapping, layout))


# ===================================================================================================
# Gather: cache pages of one sequence (block table) -> contiguous [num_tokens, H, D]
# ===================================================================================================
@triton.jit
def _gather_kv_kernel(
    k_cache_ptr, v_cache_ptr,  # [num_blocks, *page], strided
    block_table_ptr,  # [>= cdiv(num_tokens, block_size)], the sequence's blocks in order
    out_k_ptr, out_v_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    num_heads, block_size,
    k_block_stride, k_page_stride, k_head_stride,
    v_block_stride, v_page_stride, v_head_stride,
    out_token_stride, out_head_stride,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token_idx = tl.program_id(0).to(tl.int64)
    head_tile = tl.program_id(1)
    block_idx = tl.load(block_table_ptr + token_idx // block_size).to(tl.int64)
    block_offset = token_idx % block_size

    head_idx = (head_tile * BLOCK_H + tl.arange(0, BLOCK_H)[:, None]).to(tl.int64)  # [BLOCK_H, 1], as in scatter
    dim_idx = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
    mask = (head_idx < num_heads) & (dim_idx < HEAD_DIM)

    k_src = k_cache_ptr + block_idx * k_block_stride + block_offset * k_page_stride + head_idx * k_head_stride + dim_idx
    v_src = v_cache_ptr + block_idx * v_block_stride + block_offset * v_page_stride + head_idx * v_head_stride + dim_idx
    out = token_idx * out_token_stride + head_idx * out_head_stride + dim_idx
    tl.store(out_k_ptr + out, tl.load(k_src, mask=mask), mask=mask)
    tl.store(out_v_ptr + out, tl.load(v_src, mask=mask), mask=mask)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, *,
              layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's first ``num_tokens`` tokens out of paged caches, in Triton.

    Same contract as :func:`kvfast.cache.ops.gather_kv`, bit for bit.

    Args:
        k_cache, v_cache: One layer's pages in ``layout`` (see :func:`scatter_kv`), last dimension contiguous.
        block_table: ``[>= ceil(num_tokens / block_size)]`` int32/int64, the sequence's blocks in order. Precondition
            (not checked): entries are below ``num_blocks``.
        num_tokens:
        layout: one of {"NHD", "HND"}.

    Returns:
        tuple of torch.Tensor: K and V, each a new contiguous ``[num_tokens, num_kv_heads, head_dim]`` tensor.

    Example:
        >>> k, v = gather_kv(cache.key_cache(0), cache.value_cache(0), table, 20)  # doctest: +SKIP
        >>> k.shape                                                                 # doctest: +SKIP
        torch.Size([20, 8, 128])
    """
    plan = _checks.plan_gather(k_cache, v_cache, block_table, num_tokens, layout)
    if plan.num_tokens == 0:
        return plan.k, plan.v
    block_h, block_d = _tile(plan.num_heads, plan.head_dim)
    grid = (plan.num_tokens, triton.cdiv(plan.num_heads, block_h))
    with _on_device(plan.k_cache):
        _gather_kv_kernel[grid](
            plan.k_cache, plan.v_cache, plan.block_table, plan.out_k, plan.out_v,
            plan.num_heads, plan.block_size,
            *plan.k_cache_strides, *plan.v_cache_strides, *plan.out_strides,
            HEAD_DIM=plan.head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=_NUM_WARPS,
        )
    return plan.k, plan.v
