"""csrc/cuda/ run on the CPU: the GPU sink's per-chunk enqueue and the CUDA kernels' index math, no GPU needed.

``kvfast._C_cuda_host`` is compiled from the sources nvcc compiles into ``kvfast._C_cuda``: the kernels' bodies and
launch planning (``paged_kv_kernels.h``) and the sink's per-chunk arithmetic (``sink_plan.h``); a launch is a loop
over every CTA and every thread of the grid (``host_emulation.cpp``). So these tests check, on any machine:

- the sink: every chunk of a real .kvf file goes through what ``GpuSink::load`` enqueues after reading and checking
  it (``scatter``: the kernel with ``chunk_scatter_args``; ``dma``: the runs of ``chunk_dma_runs``), the CPU
  standing in for the device, with the page geometry ``kvfast.loader.native`` hands ``GpuLoadJob``; the cache must equal
  the Python reference path's byte for byte, for every layout, block size, dtype, prefix and block order;
- the kernels: a seeded sweep of thousands of random problems (element sizes, shapes, cache stacks, strided
  sources and index tensors, base addresses that narrow the copy word) against :mod:`kvfast.cache.ops`, whole buffers
  compared, so a write anywhere else fails too; every copy word the launcher can choose is exercised.

tests/test_kernels.py runs its matrix on the same emulation as the ``cuda-host`` backend.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kvfast
from kvfast.cache import ops
from kvfast.kernels import _checks
from kvfast.loader.native import GpuJob
from tests.test_native_loader import FP, N, make_cache, save_random

_C_cuda_host = pytest.importorskip("kvfast._C_cuda_host", reason="kvfast._C_cuda_host is not built")
from kvfast.kernels import cuda_host  # noqa: E402

LAYOUTS = ["NHD", "HND"]
METHODS = ["scatter", "dma"]
BLOCK_SIZES = [1, 7, 16, 256]  # 7: runs that straddle chunks (64 tokens) at odd places
PREFIXES = [None, 1, 64, 65, 299]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_ORDERS = ["in-order", "fragmented"]
SWEEP_CASES = 2000
SEED = 0


# ===================================================================================================
# The GPU sink's enqueue, chunk by chunk
# ===================================================================================================
def fragment(cache: kvfast.PagedKVCache) -> None:
    """Leave the allocator's free list out of order, so the next sequence's blocks are neither adjacent nor
    ascending (a run's page address then comes from the block table, not from arithmetic on the first block)."""
    held = [cache.new_sequence() for _ in range(4)]
    for seq in held:
        cache.append_slots(seq, 2 * cache.block_size)
    cache.free(held[2])
    cache.free(held[0])


def sink_load(path, cache: kvfast.PagedKVCache, n: int, method: str) -> tuple[kvfast.KVSequence, int]:
    """Every chunk the load needs, read and checked by the reader, then through the emulated sink's enqueue."""
    seq = cache.new_sequence()
    cache.append_slots(seq, n)
    geometry, item = GpuJob.geometry(cache.pages)
    table = np.asarray(seq.block_table, dtype=np.int64)
    copies = 0
    with kvfast.open(path) as reader:
        for c in reader.chunks:
            if c.start >= n:
                continue
            stored = reader.read_stored(c, verify=True)
            copies += _C_cuda_host.sink_chunk(
                method, (c.index, c.layer, c.start, c.stop, c.offset, c.length, c.crc32c), stored.ctypes.data,
                cache.key_cache(c.layer).data_ptr(), cache.value_cache(c.layer).data_ptr(), geometry, item, table, n)
    return seq, copies


def check_sink(tmp_path, *, method="scatter", layout="NHD", block_size=16, num_tokens=None, dtype=torch.bfloat16,
               block_order="in-order") -> int:
    path, *_ = save_random(tmp_path / "doc.kvf", dtype=dtype)
    n = N if num_tokens is None else num_tokens
    ref, out = (make_cache(N + 8 * block_size, block_size, dtype, layout) for _ in range(2))
    if block_order == "fragmented":
        fragment(ref)
        fragment(out)
    expected = kvfast.load(path, ref, fingerprint=FP, backend="python", num_tokens=n)
    seq, copies = sink_load(path, out, n, method)
    assert seq.block_table == expected.block_table
    assert torch.equal(out.storage.view(torch.uint8), ref.storage.view(torch.uint8))
    return copies


@pytest.mark.parametrize("num_tokens", PREFIXES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_sink_enqueue_equals_python_path(tmp_path, method, layout, block_size, num_tokens):
    if method == "dma" and layout == "HND":
        pytest.skip("dma needs token rows contiguous in a page (NHD)")
    check_sink(tmp_path, method=method, layout=layout, block_size=block_size, num_tokens=num_tokens)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_sink_enqueue_dtypes(tmp_path, method, dtype):
    check_sink(tmp_path, method=method, dtype=dtype)


@pytest.mark.parametrize("block_order", BLOCK_ORDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_sink_enqueue_block_orders(tmp_path, method, layout, block_order):
    if method == "dma" and layout == "HND":
        pytest.skip("dma needs token rows contiguous in a page (NHD)")
    check_sink(tmp_path, method=method, layout=layout, block_size=7, block_order=block_order)


def test_sink_dma_copies_one_run_per_block_and_half(tmp_path):
    # 300 tokens in chunks of 64 and blocks of 16, 3 layers: each full chunk is 4 runs of K and 4 of V, the last
    # (44 tokens) 3 of each; the scatter method launches one kernel per chunk.
    assert check_sink(tmp_path, method="dma", block_size=16) == 3 * (4 * 2 * 4 + 2 * 3)
    assert check_sink(tmp_path, method="scatter", block_size=16) == 3 * 5


@pytest.mark.parametrize("change, message", [
    ({"method": "bounce"}, "method must be 'scatter' or 'dma'"),
    ({"layout": "HND", "method": "dma"}, "token rows are contiguous"),
    ({"num_tokens": 0}, "bad token range"),
    ({"table": np.array([0], dtype=np.int64)}, "block_table is too short"),
])
def test_sink_chunk_refuses_what_the_gpu_job_refuses(tmp_path, change, message):
    path, *_ = save_random(tmp_path / "doc.kvf")
    cache = make_cache(N, 16, torch.bfloat16, change.get("layout", "NHD"))
    seq = cache.new_sequence()
    cache.append_slots(seq, N)
    geometry, item = GpuJob.geometry(cache.pages)
    with kvfast.open(path) as reader:
        c = reader.chunks[0]
        stored = reader.read_stored(c)
    with pytest.raises(ValueError, match=message):
        _C_cuda_host.sink_chunk(change.get("method", "scatter"), (c.index, c.layer, c.start, c.stop, c.offset,
                                c.length, c.crc32c), stored.ctypes.data, cache.key_cache(0).data_ptr(),
                                cache.value_cache(0).data_ptr(), geometry, item,
                                change.get("table", np.asarray(seq.block_table, dtype=np.int64)),
                                change.get("num_tokens", N))


# ===================================================================================================
# The kernels: a sweep of random problems against kvfast.cache.ops
# ===================================================================================================
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
STACKS = ["separate", "kv-first", "blocks-first", "packed"]


def random_buffer(shape: tuple[int, ...], dtype: torch.dtype, offset: int, gen: torch.Generator) -> torch.Tensor:
    """A random ``shape`` tensor that starts ``offset`` elements into a larger buffer (a base address that is not
    16-byte aligned when ``offset * itemsize`` is not a multiple of 16)."""
    numel = int(np.prod(shape))
    info = torch.iinfo(dtype)
    flat = torch.randint(info.min, info.max, (numel + offset,), dtype=dtype, generator=gen)
    return flat[offset:].view(shape)


def layer_pages(rng: random.Random, gen: torch.Generator, dtype, layout: str, num_blocks: int, block_size: int,
                heads: int, head_dim: int):
    """(base tensors, their (k_cache, v_cache) views): one layer's pages in a random stack and base address."""
    page = (block_size, heads, head_dim) if layout == "NHD" else (heads, block_size, head_dim)
    stack, offset = rng.choice(STACKS), rng.choice([0, 0, 1, 2, 4, 8])
    if stack == "separate":
        bases = [random_buffer((num_blocks, *page), dtype, offset, gen) for _ in range(2)]
        return bases, lambda b: (b[0], b[1])
    if stack == "kv-first":
        return [random_buffer((2, num_blocks, *page), dtype, offset, gen)], lambda b: (b[0][0], b[0][1])
    if stack == "blocks-first":
        return [random_buffer((num_blocks, 2, *page), dtype, offset, gen)], lambda b: (b[0][:, 0], b[0][:, 1])
    packed = random_buffer((num_blocks, *page[:-1], 2 * head_dim), dtype, offset, gen)
    return [packed], lambda b: (b[0][..., :head_dim], b[0][..., head_dim:])


def source_rows(rng: random.Random, gen: torch.Generator, dtype, num_tokens: int, heads: int,
                head_dim: int) -> torch.Tensor:
    view, offset = rng.choice(["contiguous", "heads-major", "padded"]), rng.choice([0, 1, 3, 8])
    if view == "contiguous":
        return random_buffer((num_tokens, heads, head_dim), dtype, offset, gen)
    if view == "heads-major":
        return random_buffer((heads, num_tokens, head_dim), dtype, offset, gen).transpose(0, 1)
    return random_buffer((num_tokens, heads, head_dim + rng.choice([1, 2, 8])), dtype, offset, gen)[..., :head_dim]


def maybe_strided(rng: random.Random, index: torch.Tensor) -> torch.Tensor:
    if rng.random() < 0.5:
        return index
    return torch.stack((index, index.roll(1)), dim=1)[:, 0]


def random_problem(rng: random.Random):
    elem = rng.choice([1, 2, 4, 8])
    heads = rng.choice([1, 2, 3, 5, 8])
    head_dim = rng.choice([1, 2, 3, 4, 6, 8, 12, 16, 24, 64, 80, 128])
    block_size = rng.choice([1, 2, 3, 5, 16, 32])
    num_tokens = rng.randint(0, 40)
    num_blocks = -(-num_tokens // block_size) + rng.randint(1, 3)
    return BITS[elem], rng.choice(["NHD", "HND"]), heads, head_dim, block_size, num_tokens, num_blocks


def sweep_scatter(rng: random.Random, gen: torch.Generator) -> int:
    dtype, layout, heads, head_dim, block_size, num_tokens, num_blocks = random_problem(rng)
    bases, views = layer_pages(rng, gen, dtype, layout, num_blocks, block_size, heads, head_dim)
    src_k, src_v = (source_rows(rng, gen, dtype, num_tokens, heads, head_dim) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots = torch.where(torch.rand(num_tokens, generator=gen) < 0.2, -1, slots).to(rng.choice([torch.int32,
                                                                                                torch.int64]))
    expected = [b.clone() for b in bases]
    ops.scatter_kv(src_k, src_v, *views(expected), slots, layout=layout)
    word = cuda_host._KERNELS._launch_scatter(_checks.plan_scatter_one_layer(
        src_k, src_v, *views(bases), maybe_strided(rng, slots), layout, "cpu"))
    for actual, want in zip(bases, expected):
        assert torch.equal(actual, want), (dtype, layout, heads, head_dim, block_size, num_tokens, word)
    return word


def sweep_scatter_layers(rng: random.Random, gen: torch.Generator) -> int:
    dtype, layout, heads, head_dim, block_size, num_tokens, num_blocks = random_problem(rng)
    num_layers = rng.randint(1, 4)
    page = (block_size, heads, head_dim) if layout == "NHD" else (heads, block_size, head_dim)
    storage = random_buffer((num_layers, 2, num_blocks, *page), dtype, rng.choice([0, 1, 8]), gen)
    staged = num_tokens + rng.choice([0, 3])  # a staging buffer longer than the chunk: src is a slice of it
    src = random_buffer((num_layers, 2, staged, heads, head_dim), dtype, rng.choice([0, 2]), gen)[:, :, :num_tokens]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    expected = storage.clone()
    ops.scatter_kv_layers(src, expected, slots, layout=layout)
    word = cuda_host._KERNELS._launch_scatter(_checks.plan_scatter_layers(src, storage, maybe_strided(rng, slots),
                                                                          layout, "cpu"))
    assert torch.equal(storage, expected), (dtype, layout, num_layers, heads, head_dim, block_size, num_tokens, word)
    return word


def sweep_gather(rng: random.Random, gen: torch.Generator) -> int:
    dtype, layout, heads, head_dim, block_size, num_tokens, num_blocks = random_problem(rng)
    bases, views = layer_pages(rng, gen, dtype, layout, num_blocks, block_size, heads, head_dim)
    table = torch.randperm(num_blocks, generator=gen)[: -(-num_tokens // block_size) + 1]
    before = [b.clone() for b in bases]
    expected = ops.gather_kv(*views(bases), table, num_tokens, layout=layout)
    plan = _checks.plan_gather(*views(bases), maybe_strided(rng, table), num_tokens, layout, "cpu")
    word = cuda_host._KERNELS._launch_gather(plan)
    for actual, want in zip((plan.k, plan.v), expected):
        assert torch.equal(actual, want), (dtype, layout, heads, head_dim, block_size, num_tokens, word)
    assert all(torch.equal(b, e) for b, e in zip(bases, before))  # gather only reads
    return word


@pytest.mark.parametrize("sweep", [sweep_scatter, sweep_scatter_layers, sweep_gather], ids=lambda f: f.__name__)
def test_kernel_sweep_against_reference(sweep):
    rng, gen = random.Random(SEED), torch.Generator().manual_seed(SEED)
    words = {sweep(rng, gen) for _ in range(SWEEP_CASES)}
    # 0: an empty launch; 1..16: every copy word, down to single bytes.
    assert words == {0, 1, 2, 4, 8, 16}, f"the sweep chose only the copy words {sorted(words)}"
