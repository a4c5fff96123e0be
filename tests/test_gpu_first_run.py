"""The first GPU run's checks: what a review of the never-run CUDA path found, each made a test (issue 18).

bench/gpu_check.sh runs this file first. Every test compares bytes exactly or asserts an ordering that a wrong
implementation breaks deterministically (a long kernel holds one stream while the other is checked):

- a large document (Qwen-like rows, 128 chunks) loaded with 1 and 4 threads and 2 ring slots, so every staging
  slot is reused many times, by both device methods and in both layouts, and by the Python path (a coded file
  the Triton decoder writes into the pages); each layer is gathered on a fresh side stream right after
  ``stream_wait_layer``, which alone orders the gather after the layer's copies;
- ``layer_ready`` answered "not yet" by CUDA, then a kernel launched on the same thread: a stale
  ``cudaErrorNotReady`` must not make that launch raise; ``done()`` is false until every copy landed;
- a load's writes start after the work the caller queued on its stream (a zeroing of the cache behind a long
  kernel), and after nothing else: a long kernel on another stream does not hold the load up, and the staging
  buffers come from the pool (no allocation, hence no cudaFree, per load);
- a cache on ``cuda:1`` while ``cuda:0`` is current (machines with two devices);
- head offsets past 2**31 elements, through heads-major sources and heads-outer caches (Triton and CUDA kernels).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

import kvfast
import kvfast.loader.native
from kvfast.loader import LoadHandle
from kvfast.loader.native import GpuJob
from kvfast.loader.reference import PythonJob
from kvfast._backend import native_cuda

HAS_GPU = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device"),
    pytest.mark.skipif(native_cuda is None, reason="kvfast._C_cuda is not built (no nvcc at install)"),
]

LAYERS, TOKENS, HEADS, HEAD_DIM, CHUNK = 16, 2048, 8, 128, 256  # 134 MB of bf16 K and V, 128 chunks
BLOCK_SIZE = 16
FP = "sha256:" + "ef" * 32
HOLD_S = 3.0  # how long the long kernels hold their stream: far longer than reading and enqueueing the document
LOADS = [("native", "scatter", "NHD"), ("native", "scatter", "HND"), ("native", "dma", "NHD")]
THREADS = [1, 4]


@functools.lru_cache(maxsize=None)
def _cycles_per_second() -> float:
    cycles = 20_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)


def sleep_cycles(seconds: float) -> int:
    """Cycles of torch.cuda._sleep (a one-thread spinning kernel) that hold a stream about ``seconds``."""
    return int(seconds * _cycles_per_second())


def random_bits(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """bf16 of uniformly random bytes: every bit pattern (NaN payloads included) must arrive as it was."""
    return torch.randint(0, 256, (*shape[:-1], 2 * shape[-1]), dtype=torch.uint8, generator=gen).view(torch.bfloat16)


def document(folder, *, coded: bool):
    """A .kvf of LAYERS x TOKENS tokens: random bits (raw), or bf16 normals (coded: exponents that compress, so
    every chunk is stored coded and decoded on the device)."""
    gen = torch.Generator().manual_seed(18)
    if coded:
        make = lambda: torch.randn(TOKENS, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)  # noqa: E731
    else:
        make = lambda: random_bits((TOKENS, HEADS, HEAD_DIM), gen)  # noqa: E731
    keys, values = [make() for _ in range(LAYERS)], [make() for _ in range(LAYERS)]
    ids = torch.randint(0, 32000, (TOKENS,), generator=gen)
    path = kvfast.save_kv(folder / ("coded.kvf" if coded else "raw.kvf"), keys, values, ids, fingerprint=FP,
                          chunk_tokens=CHUNK, codec="lossless" if coded else "raw")
    if coded:
        with kvfast.open(path) as reader:
            assert all(c.length < c.raw_length for c in reader.chunks), "a chunk is stored raw: not a decode test"
    return path, keys, values


@pytest.fixture(scope="module")
def raw_doc(tmp_path_factory):
    return document(tmp_path_factory.mktemp("raw"), coded=False)


@pytest.fixture(scope="module")
def coded_doc(tmp_path_factory):
    return document(tmp_path_factory.mktemp("coded"), coded=True)


def new_cache(layout: str = "NHD", device: str = "cuda") -> kvfast.PagedKVCache:
    cache = kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=TOKENS // BLOCK_SIZE + 8, block_size=BLOCK_SIZE,
                                dtype=torch.bfloat16, layout=layout, device=device)
    cache.append_slots(cache.new_sequence(), 3)  # another sequence holds block 0: the document starts at block 1
    return cache


def start_after(path, cache, queue: Callable[[], None], backend: str, method: str | None = None,
                threads: int = 2, tokens: int = TOKENS) -> LoadHandle:
    """A load of the first ``tokens`` tokens in kvfast.load_async's order (sequence allocated, then the job made),
    with ``queue()`` enqueuing work on the caller's current stream in between. kvfast.load_async itself cannot show
    the ordering: allocating copies the slots with a synchronous ``.to(device)``, which waits for the caller's
    stream before the job exists."""
    reader = kvfast.open(path)
    seq = cache.new_sequence()
    slots = cache.append_slots(seq, tokens)
    queue()
    table = np.asarray(seq.block_table, dtype=np.int64)
    if backend == "native":
        job = GpuJob(reader, cache.pages, table, tokens, True, threads, method)
        reader.close()  # the job reads through its own descriptor
    else:
        job = PythonJob(reader, cache.pages, slots, tokens, True, close_reader=True, blocking=False)
    return LoadHandle(job, num_layers=LAYERS, num_tokens=tokens, backend=backend, method=method or "decode",
                      device=cache.device, sequence=seq, on_failure=lambda: cache.free(seq))


def hold_current_stream() -> None:
    torch.cuda._sleep(sleep_cycles(HOLD_S))


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return torch.equal(actual.cpu().contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))


def check_layers_on_side_streams(handle: LoadHandle, cache, keys, values) -> None:
    """Each layer gathered on a fresh side stream right after stream_wait_layer; the host waits only for the
    gather, which must see every byte of the layer."""
    for layer in range(LAYERS):
        side = torch.cuda.Stream(cache.device)
        handle.stream_wait_layer(layer, side)
        with torch.cuda.stream(side):
            k, v = cache.gather(handle.sequence, layer)
        side.synchronize()
        assert same_bits(k, keys[layer]), f"layer {layer} K differs"
        assert same_bits(v, values[layer]), f"layer {layer} V differs"
    handle.wait()
    assert handle.done()


# ===================================================================================================
# A large document, layer by layer on side streams
# ===================================================================================================
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("backend, method, layout", LOADS)
def test_large_document_layer_by_layer_on_side_streams(raw_doc, monkeypatch, backend, method, layout, threads):
    monkeypatch.setattr(kvfast.loader.native, "GPU_RING_SLOTS", 2)  # the smallest ring: each slot is reused 128 / threads / 2 times
    path, keys, values = raw_doc
    cache = new_cache(layout)
    handle = kvfast.load_async(path, cache, fingerprint=FP, backend=backend, method=method, threads=threads)
    check_layers_on_side_streams(handle, cache, keys, values)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_coded_document_decoded_on_the_device_layer_by_layer_on_side_streams(coded_doc, layout):
    path, keys, values = coded_doc
    cache = new_cache(layout)
    handle = kvfast.load_async(path, cache, fingerprint=FP)
    assert handle.method == "decode"
    check_layers_on_side_streams(handle, cache, keys, values)


# ===================================================================================================
# A "not ready" answer, then a launch on the same thread
# ===================================================================================================
def test_layer_ready_not_yet_then_a_launch_on_the_same_thread(raw_doc, monkeypatch):
    from kvfast.kernels import cuda as cuda_kernels

    # A worker reuses a ring slot only once the copy that read it landed, which the hold below delays: with a ring
    # as long as a layer, layer 0 is enqueued however the workers share its chunks.
    monkeypatch.setattr(kvfast.loader.native, "GPU_RING_SLOTS", TOKENS // CHUNK)
    path, keys, values = raw_doc
    cache = new_cache()
    # The job starts behind a long kernel on the caller's stream, so its layers are enqueued long before they land.
    handle = start_after(path, cache, hold_current_stream, "native", "scatter")
    handle.stream_wait_layer(0, torch.cuda.Stream())  # the host waits until layer 0 is enqueued, not landed
    assert not handle.layer_ready(0), "layer 0 landed while the caller's stream was still busy"
    # The same thread's next launch: its error check must not see the query's cudaErrorNotReady.
    k_cache = torch.zeros(4, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k = random_bits((5, HEADS, HEAD_DIM), torch.Generator().manual_seed(1)).cuda()
    cuda_kernels.scatter_kv(k, k, k_cache, k_cache.clone(), torch.arange(5, device="cuda"))
    assert same_bits(k_cache.view(-1, HEADS, HEAD_DIM)[:5], k.cpu())
    seq = handle.wait()
    for layer in (0, LAYERS - 1):
        assert same_bits(cache.gather(seq, layer)[0], keys[layer])


def test_done_only_when_every_copy_landed(raw_doc, monkeypatch):
    # One chunk per layer, and a ring that holds them all: every chunk is enqueued while the hold lasts.
    monkeypatch.setattr(kvfast.loader.native, "GPU_RING_SLOTS", LAYERS)
    path, keys, values = raw_doc
    cache = new_cache()
    handle = start_after(path, cache, hold_current_stream, "native", "scatter", tokens=CHUNK)
    handle.stream_wait_layer(LAYERS - 1, torch.cuda.Stream())  # every chunk enqueued: the workers stop now
    time.sleep(0.2)
    assert not handle.done(), "done() while the copies still wait behind the caller's stream"
    seq = handle.wait()
    assert handle.done() and same_bits(cache.gather(seq, LAYERS - 1)[0], keys[LAYERS - 1][:CHUNK])


# ===================================================================================================
# Ordering against the caller's streams: after its own stream's work, never behind another stream's
# ===================================================================================================
@pytest.mark.parametrize("backend, method", [("native", "scatter"), ("native", "dma"), ("python", None)])
def test_a_load_starts_after_work_queued_on_the_callers_stream(raw_doc, coded_doc, backend, method):
    path, keys, values = coded_doc if backend == "python" else raw_doc
    cache = new_cache()

    def zero_behind_a_long_kernel() -> None:  # a load that does not wait for it is wiped out by it
        hold_current_stream()
        cache.storage.zero_()

    seq = start_after(path, cache, zero_behind_a_long_kernel, backend, method).wait()
    for layer in range(LAYERS):
        assert same_bits(cache.gather(seq, layer)[1], values[layer]), f"layer {layer} V was overwritten"


@pytest.mark.parametrize("method", ["scatter", "dma"])
def test_a_load_does_not_wait_for_other_streams_and_reuses_its_staging(raw_doc, method):
    path, keys, values = raw_doc
    cache = new_cache()
    device = cache.device.index
    cache.free(kvfast.load(path, cache, fingerprint=FP, backend="native", method=method))  # fills the pool
    pool = native_cuda.staging_pool_stats(device)
    busy = torch.cuda.Stream()
    with torch.cuda.stream(busy):
        torch.cuda._sleep(sleep_cycles(HOLD_S))
        busy_done = torch.cuda.Event()
        busy_done.record()
    start = time.perf_counter()
    seq = kvfast.load(path, cache, fingerprint=FP, backend="native", method=method)
    seconds = time.perf_counter() - start
    assert not busy_done.query(), (f"the load took {seconds:.2f} s and returned only after a kernel on another "
                                   "stream finished: something in it waits for the whole device")
    after = native_cuda.staging_pool_stats(device)
    assert after["allocations"] == pool["allocations"], (pool, after)
    assert after["in_use"] == 0, after
    for layer in (0, LAYERS // 2, LAYERS - 1):
        assert same_bits(cache.gather(seq, layer)[0], keys[layer])
    busy_done.synchronize()


# ===================================================================================================
# A cache on the second device while the first is current
# ===================================================================================================
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend, method", [("native", "scatter"), ("native", "dma"), ("python-coded", None)])
def test_a_cache_on_cuda_1_while_cuda_0_is_current(raw_doc, coded_doc, backend, method):
    path, keys, values = coded_doc if backend == "python-coded" else raw_doc
    options = {"backend": "native", "method": method} if method else {}
    with torch.cuda.device(0):
        cache = new_cache(device="cuda:1")
        assert cache.device == torch.device("cuda", 1)
        handle = kvfast.load_async(path, cache, fingerprint=FP, **options)
        handle.stream_wait_layer(0)  # cuda:1's current stream, not cuda:0's
        k, v = cache.gather(handle.sequence, 0)
        assert k.device == torch.device("cuda", 1) and same_bits(k, keys[0]) and same_bits(v, values[0])
        seq = handle.wait()
        assert same_bits(cache.gather(seq, LAYERS - 1)[0], keys[LAYERS - 1])
        assert torch.cuda.current_device() == 0


# ===================================================================================================
# Head offsets past 2**31 elements
# ===================================================================================================
KERNEL_MODULES = ["cuda", "triton"]


def kernels(name: str):
    if name == "cuda":
        from kvfast.kernels import cuda as module
    else:
        from kvfast.kernels import paged_kv as module
    return module


def past_2_31_tokens() -> int:
    """Tokens T with (HEADS - 1) * T * HEAD_DIM past 2**31: the last head's offset in a heads-major tensor."""
    return 2**31 // ((HEADS - 1) * HEAD_DIM) + 1024


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_scatter_from_a_heads_major_source_past_2_31_elements(name):
    tokens = past_2_31_tokens()  # x 8 heads x 128: 2.5e9 elements, 4.9 GB
    if torch.cuda.mem_get_info()[0] < 8e9:
        pytest.skip("needs 8 GB of free GPU memory")
    src = torch.empty(HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device="cuda").transpose(0, 1)  # head stride T*D
    last = random_bits((64, HEADS, HEAD_DIM), torch.Generator().manual_seed(2)).cuda()
    src[-64:] = last
    slots = torch.full((tokens,), -1, dtype=torch.int64, device="cuda")
    slots[-64:] = torch.arange(64, device="cuda")
    k_cache = torch.zeros(64 // BLOCK_SIZE, BLOCK_SIZE, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    kernels(name).scatter_kv(src, src, k_cache, v_cache, slots)
    assert same_bits(k_cache.view(64, HEADS, HEAD_DIM), last.cpu())
    assert same_bits(v_cache.view(64, HEADS, HEAD_DIM), last.cpu())
    del src
    torch.cuda.empty_cache()


@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_gather_from_a_heads_outer_cache_past_2_31_elements(name):
    blocks = -(-past_2_31_tokens() // BLOCK_SIZE)
    if torch.cuda.mem_get_info()[0] < 8e9:
        pytest.skip("needs 8 GB of free GPU memory")
    base = torch.empty(HEADS, blocks, BLOCK_SIZE, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    pages = base.permute(1, 2, 0, 3)  # NHD [blocks, block_size, H, D] whose head stride is blocks * bs * D
    last = random_bits((4, BLOCK_SIZE, HEADS, HEAD_DIM), torch.Generator().manual_seed(3)).cuda()
    pages[-4:] = last
    table = torch.arange(blocks - 4, blocks, device="cuda")
    k, v = kernels(name).gather_kv(pages, pages, table, 4 * BLOCK_SIZE)
    assert same_bits(k, last.reshape(-1, HEADS, HEAD_DIM).cpu()) and same_bits(v, k.cpu())
    del base, pages
    torch.cuda.empty_cache()


def test_the_staging_pool_is_per_device_and_trims(raw_doc):
    path, *_ = raw_doc
    cache = new_cache()
    cache.free(kvfast.load(path, cache, fingerprint=FP, backend="native"))
    stats = native_cuda.staging_pool_stats(cache.device.index)
    assert stats["cached_buffers"] > 0 and stats["in_use"] == 0, stats
    native_cuda.trim_staging_pool(cache.device.index)
    assert native_cuda.staging_pool_stats(cache.device.index)["cached_bytes"] == 0
