"""Paged-cache kernels, installed as ``kvfast.kernels``.

- ``kvfast.kernels.scatter_kv``, ``scatter_kv_layers``, ``gather_kv``: the Triton kernels (``paged_kv.py``).
- ``kvfast.kernels.cuda``: the same three over the CUDA extension ``kvfast._C_cuda`` (``csrc/cuda/``).
- ``kvfast.kernels.cuda_host``: those CUDA kernels compiled for the CPU (``kvfast._C_cuda_host``), for tests.

Each has a pure-PyTorch reference with the same signature in :mod:`kvfast.cache.ops`. Which one kvfast itself uses
is decided in one place, :func:`kvfast._backend.paged_kernels`.

The Triton functions are imported on first use, so ``import kvfast.kernels.cuda`` needs no Triton and
``TRITON_INTERPRET`` is read when a kernel is first touched, not when the package is imported.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["gather_kv", "scatter_kv", "scatter_kv_layers"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kvfast.kernels.paged_kv"), name)
    raise AttributeError(f"module 'kvfast.kernels' has no attribute {name!r}")
