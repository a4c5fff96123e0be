"""The native GPU load path (kvfast._C_cuda.GpuLoadJob behind kvfast.load for CUDA caches).

On a GPU: bit-identical to the Python reference path loading into a host cache, for every dtype, layout, block
size, prefix and both device methods ("scatter": staging copy + kernel, "dma": a copy per run of tokens); a
corrupted chunk never reaches the device and leaves the cache as it was; per-layer events order a stream.
Without a GPU (here): the binding's boundary checks, which run before any CUDA call, and the error that names
the CUDA call when there is no device.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import kvfast
from kvfast._backend import native_cuda
from kvfast.errors import ChecksumError
from tests.conftest import flip_bit
from tests.test_native_loader import FP, HEAD_DIM, HEADS, LAYERS, N, make_cache, save_random

pytestmark = pytest.mark.skipif(native_cuda is None, reason="kvfast._C_cuda is not built (no nvcc at install)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 16, 256]
GPU_METHODS = ["scatter", "dma"]


def gpu_cache(n: int, block_size: int = 16, dtype=torch.bfloat16, layout: str = "NHD") -> kvfast.PagedKVCache:
    """make_cache's cache (random bytes, busy block 0) on the GPU."""
    host = make_cache(n, block_size, dtype, layout)
    cache = kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=host.num_blocks, block_size=block_size,
                                dtype=dtype, layout=layout, device="cuda")
    cache.storage.copy_(host.storage)
    cache.append_slots(cache.new_sequence(), 1)
    return cache


def gpu_load(path, n, block_size, dtype, layout, method, **options):
    """Load into a host cache (Python path) and a CUDA cache (native path) that start with the same bytes."""
    ref = make_cache(n, block_size, dtype, layout)
    out = gpu_cache(n, block_size, dtype, layout)
    a = kvfast.load(path, ref, fingerprint=FP, backend="python", **options)
    b = kvfast.load(path, out, fingerprint=FP, backend="native", method=method, **options)
    assert a.block_table == b.block_table
    assert torch.equal(ref.storage.view(torch.uint8), out.storage.cpu().view(torch.uint8))
    return out, b


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", GPU_METHODS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [None, 1, 65, 299])
def test_gpu_path_equals_python_path(tmp_path, dtype, layout, block_size, method, num_tokens):
    if method == "dma" and layout == "HND":
        pytest.skip("dma needs token rows contiguous in a page (NHD)")
    path, *_ = save_random(tmp_path / "doc.kvf", dtype=dtype)
    gpu_load(path, N, block_size, dtype, layout, method, num_tokens=num_tokens)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method", GPU_METHODS)
def test_gpu_corrupt_chunk_never_lands(tmp_path, method):
    path, *_ = save_random(tmp_path / "doc.kvf")
    with kvfast.open(path) as reader:
        middle = reader.chunks[len(reader.chunks) // 2]
    flip_bit(path, middle.offset + 5)
    cache = gpu_cache(N)
    before, free = cache.storage.clone(), cache.num_free_blocks
    with pytest.raises(ChecksumError, match="chunk"):
        kvfast.load(path, cache, fingerprint=FP, backend="native", method=method)
    assert cache.num_free_blocks == free
    # chunks before the bad one may have landed in the (now freed) blocks; the busy block 0 is untouched
    assert torch.equal(cache.storage[:, :, 0], before[:, :, 0])


@pytest.mark.gpu
@needs_gpu
def test_gpu_stream_wait_layer_orders_a_stream(tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf")
    cache = gpu_cache(N)
    handle = kvfast.load_async(path, cache, fingerprint=FP, backend="native")
    stream = torch.cuda.Stream()
    for layer in range(LAYERS):
        handle.stream_wait_layer(layer, stream)
        with torch.cuda.stream(stream):
            k, _ = cache.gather(handle.sequence, layer)  # enqueued behind the layer's event
        stream.synchronize()
        assert torch.equal(k.cpu().view(torch.uint8), keys[layer].contiguous().view(torch.uint8))
    handle.wait()


# -- the binding's boundary, here without a GPU --------------------------------------------------------------
def _args(tmp_path, **over):
    path, *_ = save_random(tmp_path / "doc.kvf")
    reader = kvfast.open(path)
    chunks = np.array([(c.index, c.layer, c.start, c.stop, c.offset, c.length, c.crc32c) for c in reader.chunks],
                      dtype=np.int64)
    head_bytes = 8 * 2
    args = dict(fd=reader._fd, chunks=chunks, k_pages=[1 << 20] * LAYERS, v_pages=[2 << 20] * LAYERS,
                layout=(40, 16, 2, head_bytes, 16 * 2 * head_bytes, 2 * head_bytes, head_bytes), elem_size=2,
                block_table=np.arange(19, dtype=np.int64), num_tokens=N, device=0)
    args.update(over)
    return reader, args


@pytest.mark.parametrize("change, message", [
    ({"method": "bounce"}, "method must be 'scatter' or 'dma'"),
    ({"read": "aio"}, "read must be 'preadv'"),
    ({"elem_size": 3}, "elem_size must be 1, 2, 4 or 8"),
    ({"ring_slots": 1}, "ring_slots must be in"),
    ({"threads": 0}, "threads must be in"),
    ({"num_tokens": 0}, "num_tokens must be >= 1"),
    ({"device": -1}, "device must be >= 0"),
    ({"k_pages": [1 << 20]}, "k_pages and v_pages must name the same layers"),
    ({"k_pages": [0] * LAYERS}, "a page address is null"),
    ({"layout": (40, 16, 2, 15, 512, 32, 16)}, "head_bytes a multiple of elem_size"),
    ({"layout": (40, 16, -2, 16, 512, 32, 16)}, "negative"),
    ({"block_table": np.arange(3, dtype=np.int64)}, "block_table is too short"),
    ({"block_table": np.full(19, 40, dtype=np.int64)}, "outside"),
    ({"chunks": np.zeros((0, 7), dtype=np.int64)}, "chunks must be"),
])
def test_gpu_job_refuses_bad_arguments_before_any_cuda_call(tmp_path, change, message):
    reader, args = _args(tmp_path, **change)
    with reader, pytest.raises(ValueError, match=message):
        native_cuda.GpuLoadJob(**args)


def test_gpu_job_refuses_a_chunk_of_the_wrong_length(tmp_path):
    reader, args = _args(tmp_path)
    args["chunks"][1, 5] += 2
    with reader, pytest.raises(ValueError, match=r"chunks\[1\]: length"):
        native_cuda.GpuLoadJob(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_job_without_a_device_names_the_cuda_call(tmp_path):
    reader, args = _args(tmp_path)
    with reader, pytest.raises(RuntimeError, match=r"cuda\w+\(.*\) failed: cudaError"):
        native_cuda.GpuLoadJob(**args)


def test_cpu_methods_are_refused_for_the_other_device(tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf")
    with pytest.raises(ValueError, match="is not for pages on cpu"):
        kvfast.load(path, make_cache(N), fingerprint=FP, method="dma")
