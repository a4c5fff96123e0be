"""Torch-tensor wrappers over the CUDA kernels of ``kvfast._C_cuda`` (``csrc/cuda/paged_kv.cu``).

Same three functions, signatures and bit-exact contract as :mod:`kvfast.cache.ops` and the Triton kernels. The
extension takes raw pointers, strides, the device index and a stream handle as ints, so it never links
libtorch; these wrappers (:class:`kvfast.kernels._cuda_launch.CudaKernels`) check the tensors, then launch on
the tensors' device (whatever the current device is) and its current stream, asynchronously, like any torch op.

Importing this module raises ImportError when kvfast was built without nvcc.
"""
from __future__ import annotations

from kvfast import _C_cuda
from kvfast.kernels._cuda_launch import CudaKernels, current_stream

__all__ = ["gather_kv", "scatter_kv", "scatter_kv_layers"]

_KERNELS = CudaKernels(_C_cuda, "cuda", current_stream)
scatter_kv = _KERNELS.scatter_kv
scatter_kv_layers = _KERNELS.scatter_kv_layers
gather_kv = _KERNELS.gather_kv
