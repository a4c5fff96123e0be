"""Torch-tensor wrappers over the CUDA kernels of ``kvfast._C_cuda`` (``csrc/cuda/paged_kv.cu``).

Same three functions, signatures and bit-exact contract as :mod:`kvfast.cache.ops` and the Triton kernels. The
extension takes raw pointers, strides and a stream handle as ints, so it never links libtorch; these wrappers
check the tensors (``_checks.py``), then pass ``data_ptr()``, strides and the current stream of the tensors'
device. Launches are asynchronous on that stream, like any torch op.

Importing this module raises ImportError when kvfast was built without nvcc.
"""
from __future__ import annotations

import torch

from kvfast import _C_cuda
from kvfast.kernels import _checks

__all__ = ["gather_kv", "scatter_kv", "scatter_kv_layers"]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _int64(index: torch.Tensor) -> torch.Tensor:
    # The kernels index with int64 only; an int32 slot mapping costs one small conversion on the same stream.
    return index if index.dtype == torch.int64 else index.to(torch.int64)


def _launch_scatter(plan: _checks.ScatterPlan) -> None:
    device = plan.k_cache.device
    slots = _int64(plan.slot_mapping)
    with torch.cuda.device(device):  # the launch goes to the current device: make it the tensors'
        _C_cuda.scatter_kv(
            plan.src_k.data_ptr(), plan.src_v.data_ptr(), plan.k_cache.data_ptr(), plan.v_cache.data_ptr(),
            slots.data_ptr(), plan.num_layers, plan.num_tokens, plan.num_heads, plan.head_dim, plan.block_size,
            plan.k_cache.element_size(), plan.src_k_strides, plan.src_v_strides, plan.k_cache_strides,
            plan.v_cache_strides, _stream(device),
        )


def scatter_kv(src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor, *, layout: str = "NHD") -> None:
    """Write tokens into one layer's paged K/V caches (vLLM's ``reshape_and_cache_flash``), in CUDA.

    Same contract as :func:`kvfast.cache.ops.scatter_kv` and :func:`kvfast.kernels.scatter_kv`, bit for bit.

    Parameters
    ----------
    src_k, src_v : torch.Tensor
        ``[num_tokens, num_kv_heads, head_dim]`` on a CUDA device, ``head_dim`` contiguous.
    k_cache, v_cache : torch.Tensor
        One layer's pages, NHD ``[num_blocks, block_size, H, D]`` or HND ``[num_blocks, H, block_size, D]``,
        any view whose last dimension is contiguous (packed halves, kv-first / blocks-first stack entries).
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int32/int64 on the same device; ``-1`` skips the token. Other slots must be below
        ``num_blocks * block_size`` (not checked: it would cost a device sync).
    layout : {"NHD", "HND"}

    Examples
    --------
    >>> k_cache = torch.zeros(4, 16, 2, 8, device="cuda"); v_cache = torch.zeros_like(k_cache)  # doctest: +SKIP
    >>> k = torch.randn(3, 2, 8, device="cuda")                                                 # doctest: +SKIP
    >>> scatter_kv(k, k, k_cache, v_cache, torch.tensor([17, -1, 0], device="cuda"))            # doctest: +SKIP
    >>> torch.equal(k_cache[0, 0], k[2])                                                         # doctest: +SKIP
    True
    """
    _launch_scatter(_checks.plan_scatter_one_layer(src_k, src_v, k_cache, v_cache, slot_mapping, layout, "cuda"))


def scatter_kv_layers(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                      layout: str = "NHD") -> None:
    """Write one chunk of tokens for several layers in a single launch (the loader's staging buffer), in CUDA.

    Same contract as :func:`kvfast.cache.ops.scatter_kv_layers`, bit for bit.

    Parameters
    ----------
    src : torch.Tensor
        ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``: per layer K then V, ``head_dim`` contiguous.
    cache : torch.Tensor
        ``[num_layers, 2, num_blocks, *page]`` (``PagedKVCache.storage`` or a view of that shape; see
        :func:`kvfast.kernels.scatter_kv_layers` for kv-first, blocks-first and packed stacks).
    slot_mapping : torch.Tensor
        ``[num_tokens]`` int32/int64, shared by every layer; ``-1`` skips the token.
    layout : {"NHD", "HND"}

    Examples
    --------
    >>> scatter_kv_layers(staging, cache.storage, slots, layout=cache.layout)  # doctest: +SKIP
    """
    _launch_scatter(_checks.plan_scatter_layers(src, cache, slot_mapping, layout, "cuda"))


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, *,
              layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one sequence's first ``num_tokens`` tokens out of paged caches, in CUDA.

    Same contract as :func:`kvfast.cache.ops.gather_kv`, bit for bit.

    Parameters
    ----------
    k_cache, v_cache : torch.Tensor
        One layer's pages in ``layout`` on a CUDA device, last dimension contiguous.
    block_table : torch.Tensor
        ``[>= ceil(num_tokens / block_size)]`` int32/int64, the sequence's blocks in order (each < num_blocks).
    num_tokens : int
    layout : {"NHD", "HND"}

    Returns
    -------
    tuple of torch.Tensor
        K and V, each a new contiguous ``[num_tokens, num_kv_heads, head_dim]`` tensor.

    Examples
    --------
    >>> k, v = gather_kv(cache.key_cache(0), cache.value_cache(0), table, 20)  # doctest: +SKIP
    """
    plan = _checks.plan_gather(k_cache, v_cache, block_table, num_tokens, layout, "cuda")
    device = plan.k_cache.device
    table = _int64(plan.block_table)
    with torch.cuda.device(device):
        _C_cuda.gather_kv(
            plan.k_cache.data_ptr(), plan.v_cache.data_ptr(), table.data_ptr(), plan.out_k.data_ptr(),
            plan.out_v.data_ptr(), plan.num_tokens, plan.num_heads, plan.head_dim, plan.block_size,
            plan.k_cache.element_size(), plan.k_cache_strides, plan.v_cache_strides, plan.out_strides,
            _stream(device),
        )
    return plan.k, plan.v
