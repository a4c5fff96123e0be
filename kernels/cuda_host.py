"""The CUDA kernels of ``csrc/cuda/`` run on the CPU: ``kvfast._C_cuda_host``, for tests without a GPU.

The kernels' bodies, their launch planning (checks, copy word, strides in words) and the GPU sink's per-chunk
arithmetic are compiled for the host from the same sources nvcc compiles (``csrc/cuda/paged_kv_kernels.h``,
``sink_plan.h``), and each launch is emulated by a loop over every CTA of the grid and every thread of a CTA
(``csrc/cuda/host_emulation.cpp``). These wrappers are :mod:`kvfast.kernels.cuda`'s, on CPU tensors: what they
write is what the GPU writes, index for index, which tests/test_kernels.py checks against :mod:`kvfast.cache.ops` as the
``cuda-host`` backend. Not a fast path: kvfast never picks it.
"""
from __future__ import annotations

import torch

from kvfast import _C_cuda_host
from kvfast.kernels._cuda_launch import CudaKernels

__all__ = ["gather_kv", "scatter_kv", "scatter_kv_layers"]


def _host(device: torch.device) -> tuple[int, int]:
    return 0, 0  # the emulation has no device and no stream


_KERNELS = CudaKernels(_C_cuda_host, "cpu", _host)
scatter_kv = _KERNELS.scatter_kv
scatter_kv_layers = _KERNELS.scatter_kv_layers
gather_kv = _KERNELS.gather_kv
