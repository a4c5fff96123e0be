"""How kvfast picks its paged-cache kernels for a device (kvfast._backend.paged_kernels).

A kernel module that imports is not yet one that runs: with a driver older than the CUDA runtime the extension
was built with (or no kernel image for the card, or no compiler for Triton), every write would raise. So each
candidate must pass a tiny scatter and gather on the device, checked bit for bit, before it is chosen; one that
fails is passed over for the next, and a forced one (KVFAST_KERNELS) that fails is an error naming why.

On the CPU these tests drive the same choice with the reference kernels, the CUDA kernels emulated on the host
(kvfast._C_cuda_host) and stand-in modules that fail the way a broken install does.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from kvfast import _backend
from kvfast.cache import ops


def stand_in(monkeypatch, name: str, scatter, gather) -> None:
    """Register a kernel module under ``name`` in the choice (it replaces whatever module ``name`` meant)."""
    module = types.ModuleType(f"kvfast_test_{name}_kernels")
    module.scatter_kv, module.gather_kv = scatter, gather
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(_backend._KERNEL_MODULES, name, module.__name__)


def cannot_launch(*args, **kwargs):
    raise RuntimeError("kvfast: CUDA call scatter_kv_kernel<<<>>> (kernel launch) failed: cudaErrorInsufficientDriver")


def writes_nothing_reads_zeros(k_cache, v_cache, block_table, num_tokens, *, layout="NHD"):
    shape = (num_tokens, *k_cache.shape[2:])
    return torch.zeros(shape, dtype=k_cache.dtype), torch.zeros(shape, dtype=k_cache.dtype)


def test_the_probe_passes_working_kernels():
    _backend._probe(ops, "cpu")
    cuda_host = pytest.importorskip("kvfast.kernels.cuda_host")
    _backend._probe(cuda_host, "cpu")


def test_a_module_that_cannot_launch_is_passed_over(monkeypatch):
    stand_in(monkeypatch, "cuda", cannot_launch, cannot_launch)
    assert _backend._first_working(("cuda", "torch"), "cpu") == ("torch", ops)


def test_a_module_that_copies_wrong_bytes_is_passed_over(monkeypatch):
    stand_in(monkeypatch, "cuda", lambda *args, **kwargs: None, writes_nothing_reads_zeros)
    assert _backend._first_working(("cuda", "torch"), "cpu") == ("torch", ops)


def test_a_forced_module_that_cannot_launch_says_why(monkeypatch):
    stand_in(monkeypatch, "cuda", cannot_launch, cannot_launch)
    with pytest.raises(RuntimeError, match=r"no paged-cache kernels work on cpu: cuda \(RuntimeError: .*"
                                           r"cudaErrorInsufficientDriver"):
        _backend._first_working(("cuda",), "cpu")
