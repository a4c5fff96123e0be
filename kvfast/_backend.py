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
    first of ``GPU_KERNEL_ORDER`` that imports and passes a tiny launch on that device, or ``KVFAST_KERNELS``
    when set (which then must pass). Decided once per device.

    Example:
        >>> paged_kernels("cpu")[0]
        'torch'
    """
    import torch

    requested = os.environ.get("KVFAST_KERNELS") or None
    if requested is not None and requested not in _KERNEL_MODULES:
        raise ValueError(f"KVFAST_KERNELS must be one of {sorted(_KERNEL_MODULES)}, got {requested!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _paged_kernels(str(device), requested)


@functools.lru_cache(maxsize=None)
def _paged_kernels(device: str, requested: str | None) -> tuple[str, object]:
    if not device.startswith("cuda"):
        return "torch", importlib.import_module(_KERNEL_MODULES["torch"])
    return _first_working((requested,) if requested else GPU_KERNEL_ORDER, device)


def _first_working(names: tuple[str, ...], device: str) -> tuple[str, object]:
    """The first of ``names`` whose module imports and passes :func:`_probe` on ``device``."""
    failed = []
    for name in names:
        try:
            module = importlib.import_module(_KERNEL_MODULES[name])
            _probe(module, device)
            return name, module
        except Exception as exc:  # noqa: BLE001 - not built, no triton, or it cannot launch on this device
            failed.append(f"{name} ({type(exc).__name__}: {exc})")
    raise RuntimeError(f"no paged-cache kernels work on {device}: {'; '.join(failed)}")


def _probe(module, device: str) -> None:
    """One tiny scatter and gather on ``device``, checked bit for bit.

    A kernel module that imports may still not run on this device: a driver older than the CUDA runtime it was
    built with, no kernel image for this card, no compiler for Triton. Every write would then raise; found here,
    the next module in the order takes over instead.
    """
    import torch

    src = torch.arange(1, 2 * 8 + 1, dtype=torch.int16).view(2, 1, 8)  # 2 tokens, 1 head, head_dim 8
    k_cache = torch.zeros(2, 2, 1, 8, dtype=torch.int16, device=device)  # 2 blocks of 2 tokens (NHD)
    v_cache = torch.zeros_like(k_cache)
    module.scatter_kv(src.to(device), (-src).to(device), k_cache, v_cache, torch.tensor([3, 0], device=device))
    k, v = module.gather_kv(k_cache, v_cache, torch.tensor([0, 1], device=device), 4)
    want = torch.zeros(4, 1, 8, dtype=torch.int16)
    want[0], want[3] = src[1], src[0]  # slot 0 holds token 1, slot 3 (block 1, offset 1) token 0
    if not (torch.equal(k.cpu(), want) and torch.equal(v.cpu(), -want)):
        raise RuntimeError("a scatter and gather of 2 tokens did not return them bit for bit")
