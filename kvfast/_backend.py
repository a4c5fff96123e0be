"""The one place that decides which implementation runs: the native extension or the Python reference."""
from __future__ import annotations

import functools
import importlib
import os
import warnings

try:
    from kvfast import _C as native
except ImportError as exc:  # built without a C++ toolchain: correct, but slower
    native = None
    warnings.warn(
        f"kvfast: the native extension kvfast._C is not available ({exc}); using the pure-Python path",
        RuntimeWarning,
        stacklevel=2,
    )

try:  # built only where nvcc was found; it imports (and reports 0 devices) on machines without a GPU
    from kvfast import _C_cuda as native_cuda
except ImportError:
    native_cuda = None


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of a contiguous buffer (bytes, memoryview, numpy array), continuing from ``value``."""
    if native is not None:
        return native.crc32c(data, value)
    import crc32c as _crc32c_pkg

    return _crc32c_pkg.crc32c(data, value)


def backend() -> dict[str, str]:
    """Which implementations kvfast uses on this machine, e.g.
    ``{"io": "native", "crc32c": "sse4.2", "gpu_io": "native"}``: ``io`` loads into host caches, ``gpu_io`` into
    CUDA caches (native when ``kvfast._C_cuda`` was built, whether or not a GPU is present)."""
    gpu_io = "native" if native_cuda is not None and hasattr(native_cuda, "GpuLoadJob") else "python"
    if native is None:
        return {"io": "python", "crc32c": "crc32c-package", "gpu_io": gpu_io}
    return {"io": "native", "crc32c": native.crc32c_impl(), "gpu_io": gpu_io}


# -- paged-cache kernels (scatter / gather) ---------------------------------------------------------------
# On a GPU, the order to try, fastest first. It is meant to follow bench/bench_kernels.py's numbers
# (bench/RESULTS.md); until a GPU run records them, CUDA leads because it needs no JIT warm-up and copies in
# 16-byte words by construction. KVFAST_KERNELS=cuda|triton|torch forces one (and fails if it is missing).
GPU_KERNEL_ORDER = ("cuda", "triton", "torch")
_KERNEL_MODULES = {"cuda": "kvfast.kernels.cuda", "triton": "kvfast.kernels.paged_kv", "torch": "kvfast.cache.ops"}


def paged_kernels(device) -> tuple[str, object]:
    """The scatter/gather implementation for caches on ``device``: ``(name, module)``.

    The module has ``scatter_kv``, ``scatter_kv_layers`` and ``gather_kv`` with the signatures of
    :mod:`kvfast.cache.ops`. CPU (and any non-CUDA) tensors always use that PyTorch reference; CUDA tensors use the
    first importable of ``GPU_KERNEL_ORDER``, or ``KVFAST_KERNELS`` when set.

    Example:
        >>> paged_kernels("cpu")[0]
        'torch'
    """
    import torch

    requested = os.environ.get("KVFAST_KERNELS") or None
    if requested is not None and requested not in _KERNEL_MODULES:
        raise ValueError(f"KVFAST_KERNELS must be one of {sorted(_KERNEL_MODULES)}, got {requested!r}")
    return _paged_kernels(torch.device(device).type, requested)


@functools.lru_cache(maxsize=None)
def _paged_kernels(device_type: str, requested: str | None) -> tuple[str, object]:
    if device_type != "cuda":
        return "torch", importlib.import_module(_KERNEL_MODULES["torch"])
    missing = []
    for name in (requested,) if requested else GPU_KERNEL_ORDER:
        try:
            return name, importlib.import_module(_KERNEL_MODULES[name])
        except ImportError as exc:  # not built (no nvcc) or no triton: try the next
            missing.append(f"{name} ({exc})")
    raise RuntimeError(f"no paged-cache kernels available: {'; '.join(missing)}")
