"""The torch-tensor side of kvfast's CUDA kernels, over any extension with ``kvfast._C_cuda``'s raw interface.

Two extensions have that interface (``csrc/cuda/paged_kv_py.h``): ``kvfast._C_cuda``, the kernels on a GPU
(:mod:`kvfast.kernels.cuda`), and ``kvfast._C_cuda_host``, the same kernel code compiled for the CPU and run by
a loop over the grid (:mod:`kvfast.kernels.cuda_host`, how CI tests ``csrc/cuda/`` without a GPU). One
:class:`CudaKernels` drives either: it checks the tensors (``_checks.py``), then passes ``data_ptr()``, strides,
the device index and the current stream of the tensors' device as ints.
"""
from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from kvfast.kernels import _checks

# tensors' device -> (device index, stream handle) for the extension
LaunchTarget = Callable[[torch.device], tuple[int, int]]


def current_stream(device: torch.device) -> tuple[int, int]:
    """A CUDA device's index and the handle of its current stream (0: its legacy default stream)."""
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _int64(index: torch.Tensor) -> torch.Tensor:
    # The kernels index with int64 only; an int32 slot mapping costs one small conversion on the same stream.
    return index if index.dtype == torch.int64 else index.to(torch.int64)


class CudaKernels:
    """``scatter_kv``, ``scatter_kv_layers`` and ``gather_kv`` with :mod:`kvfast.cache.ops`'s contract, over ``ext``.

    Args:
        ext: ``kvfast._C_cuda`` or ``kvfast._C_cuda_host``.
        device_type: the device type every tensor must be on (``"cuda"``, or ``"cpu"`` for the emulation).
        target: the device index and stream handle to launch on, from the tensors' device.
    """

    def __init__(self, ext: ModuleType, device_type: str, target: LaunchTarget):
        self._ext, self._device_type, self._target = ext, device_type, target

    # The launches return the copy word the kernel chose, in bytes (tests/test_cuda_host.py sweeps them all).
    def _launch_scatter(self, plan: _checks.ScatterPlan) -> int:
        slots = _int64(plan.slot_mapping)
        return self._ext.scatter_kv(
            plan.src_k.data_ptr(), plan.src_v.data_ptr(), plan.k_cache.data_ptr(), plan.v_cache.data_ptr(),
            slots.data_ptr(), plan.num_layers, plan.num_tokens, plan.num_heads, plan.head_dim, plan.block_size,
            plan.k_cache.element_size(), plan.src_k_strides, plan.src_v_strides, plan.k_cache_strides,
            plan.v_cache_strides, *self._target(plan.k_cache.device),
        )

    def scatter_kv(self, src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, layout: str = "NHD") -> None:
        """Write tokens into one layer's paged K/V caches (vLLM's ``reshape_and_cache_flash``).

        Same contract as :func:`kvfast.cache.ops.scatter_kv` and :func:`kvfast.kernels.scatter_kv`, bit for bit.

        Args:
            src_k, src_v: ``[num_tokens, num_kv_heads, head_dim]``, ``head_dim`` contiguous.
            k_cache, v_cache: One layer's pages, NHD ``[num_blocks, block_size, H, D]`` or HND ``[num_blocks, H,
                block_size, D]``, any view whose last dimension is contiguous (packed halves, kv-first / blocks-first
                stack entries).
            slot_mapping: ``[num_tokens]`` int32/int64 (any stride) on the same device; ``-1`` skips the token. Other
                slots must be below ``num_blocks * block_size`` (not checked: it would cost a device sync).
            layout: one of {"NHD", "HND"}.

        Example:
            >>> k_cache = torch.zeros(4, 16, 2, 8, device="cuda"); v_cache = torch.zeros_like(k_cache)  # doctest: +SKIP
            >>> k = torch.randn(3, 2, 8, device="cuda")                                                 # doctest: +SKIP
            >>> scatter_kv(k, k, k_cache, v_cache, torch.tensor([17, -1, 0], device="cuda"))            # doctest: +SKIP
            >>> torch.equal(k_cache[0, 0], k[2])                                                         # doctest: +SKIP
            True
        """
        self._launch_scatter(_checks.plan_scatter_one_layer(src_k, src_v, k_cache, v_cache, slot_mapping, layout,
                                                            self._device_type))

    def scatter_kv_layers(self, src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                          layout: str = "NHD") -> None:
        """Write one chunk of tokens for several layers in a single launch (a multi-layer staging buffer).

        Same contract as :func:`kvfast.cache.ops.scatter_kv_layers`, bit for bit.

        Args:
            src: ``[num_layers, 2, num_tokens, num_kv_heads, head_dim]``: per layer K then V, ``head_dim`` contiguous.
            cache: ``[num_layers, 2, num_blocks, *page]`` (``PagedKVCache.storage`` or a view of that shape; see
                :func:`kvfast.kernels.scatter_kv_layers` for kv-first, blocks-first and packed stacks).
            slot_mapping: ``[num_tokens]`` int32/int64, shared by every layer; ``-1`` skips the token.
            layout: one of {"NHD", "HND"}.

        Example:
            >>> scatter_kv_layers(staging, cache.storage, slots, layout=cache.layout)  # doctest: +SKIP
        """
        self._launch_scatter(_checks.plan_scatter_layers(src, cache, slot_mapping, layout, self._device_type))

    def gather_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int, *,
                  layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
        """Read one sequence's first ``num_tokens`` tokens out of paged caches.

        Same contract as :func:`kvfast.cache.ops.gather_kv`, bit for bit.

        Args:
            k_cache, v_cache: One layer's pages in ``layout``, last dimension contiguous.
            block_table: ``[>= ceil(num_tokens / block_size)]`` int32/int64 (any stride), the sequence's blocks in
                order (each < num_blocks).
            num_tokens:
            layout: one of {"NHD", "HND"}.

        Returns:
            tuple of torch.Tensor: K and V, each a new contiguous ``[num_tokens, num_kv_heads, head_dim]`` tensor.

        Example:
            >>> k, v = gather_kv(cache.key_cache(0), cache.value_cache(0), table, 20)  # doctest: +SKIP
        """
        plan = _checks.plan_gather(k_cache, v_cache, block_table, num_tokens, layout, self._device_type)
        self._launch_gather(plan)
        return plan.k, plan.v

    def _launch_gather(self, plan: _checks.GatherPlan) -> int:
        table = _int64(plan.block_table)
        return self._ext.gather_kv(
            plan.k_cache.data_ptr(), plan.v_cache.data_ptr(), table.data_ptr(), plan.out_k.data_ptr(),
            plan.out_v.data_ptr(), plan.num_tokens, plan.num_heads, plan.head_dim, plan.block_size,
            plan.k_cache.element_size(), plan.k_cache_strides, plan.v_cache_strides, plan.out_strides,
            *self._target(plan.k_cache.device),
        )
