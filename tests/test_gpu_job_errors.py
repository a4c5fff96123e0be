"""A CUDA failure after a GPU load's workers stopped (a synchronize, an event query) is the load's error.

The binding (kvfast._C_cuda.GpuLoadJob) records such a failure instead of raising it from wait(), so that
LoadHandle.wait() settles the load as failed: the sequence's blocks are freed, and the error names the file and
the CUDA call. These tests drive LoadHandle and kvfast.loader.native.GpuJob on the CPU with a stand-in for the binding
that answers as it does after a failed cudaStreamSynchronize (a real one needs a GPU that fails on demand).
"""
from __future__ import annotations

import pytest
import torch

import kvfast
from kvfast.errors import DeviceError
from kvfast.loader import LoadHandle
from kvfast.loader.native import GpuJob

DETAIL = "cudaStreamSynchronize(w.stream) failed: cudaErrorLaunchFailure (unspecified launch failure)"


class FailedSynchronize:
    """GpuLoadJob after its workers enqueued everything and the final synchronize failed (bindings.cpp: wait()
    returns True, error() reports ("device", -1, ...), finished() is true)."""

    def wait(self, timeout: float) -> bool:
        return True

    def error(self):
        return ("device", -1, 0, 0, DETAIL)

    def finished(self) -> bool:
        return True

    def layer_ready(self, layer: int) -> bool:
        return False


class FailedQuery(FailedSynchronize):
    """GpuLoadJob whose cudaEventQuery in layer_ready() fails: no error until that call, which records it."""

    def __init__(self):
        self.queried = False

    def error(self):
        return super().error() if self.queried else None

    def layer_ready(self, layer: int) -> bool:
        self.queried = True
        return False


def failed_handle(cache: kvfast.PagedKVCache, binding=FailedSynchronize) -> LoadHandle:
    seq = cache.new_sequence()
    cache.append_slots(seq, 40)
    job = GpuJob.__new__(GpuJob)  # the Python half of a GPU job, over the stand-in binding
    job._job, job._plan, job._path = binding(), [], "doc.kvf"
    return LoadHandle(job, num_layers=cache.num_layers, num_tokens=40, backend="native", method="scatter",
                      device=cache.device, sequence=seq, on_failure=lambda: cache.free(seq))


def test_a_failed_synchronize_frees_the_blocks_and_names_the_call():
    cache = kvfast.PagedKVCache(2, 2, 8, num_blocks=8, block_size=16, dtype=torch.float16)
    free = cache.num_free_blocks
    handle = failed_handle(cache)
    assert cache.num_free_blocks == free - 3
    with pytest.raises(DeviceError, match=r"^doc\.kvf: cudaStreamSynchronize.*cudaErrorLaunchFailure"):
        handle.wait()
    assert cache.num_free_blocks == free
    with pytest.raises(DeviceError, match="cudaErrorLaunchFailure"):  # the same error again, freed once
        handle.wait()
    assert cache.num_free_blocks == free


def test_a_failed_query_is_raised_by_layer_ready():
    cache = kvfast.PagedKVCache(2, 2, 8, num_blocks=8, block_size=16, dtype=torch.float16)
    free = cache.num_free_blocks
    with pytest.raises(DeviceError, match="cudaErrorLaunchFailure"):
        failed_handle(cache, FailedQuery).layer_ready(0)
    assert cache.num_free_blocks == free
