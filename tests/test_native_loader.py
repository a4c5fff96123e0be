"""The native load path (kvfast._C.LoadJob behind kvfast.load): bit-identical to the Python reference path,
the same errors for bad input, and load_async's per-layer readiness.

Every comparison is exact: the native and Python paths fill two caches that start with the same random bytes,
and the whole storage tensors must be equal afterwards (so the native path also wrote nothing outside the
sequence's slots).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvfast
from kvfast._backend import native
from kvfast.errors import ChecksumError, KvfastError, TruncatedFileError
from tests.conftest import flip_bit, random_ids, random_kv

pytestmark = pytest.mark.skipif(native is None, reason="kvfast._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 7, 16, 256]  # 7: runs that straddle chunk boundaries at odd places
METHODS = ["preadv", "mmap", "odirect"]
THREADS = [1, 2]
DOC_LENGTHS = [1, 63, 65, 300]  # chunk_tokens is 64: one partial chunk, one short, one over, several
PREFIXES = [1, 5, 63, 64, 65, 100, 256, 299]  # inside chunks, on chunk and block boundaries
TRUNCATE_AT = ["first-chunk", "last-chunk-page", "last-chunk-mid-page"]
FLIPPED = ["first", "middle", "last"]
CHUNK = 64
LAYERS, HEADS, HEAD_DIM = 3, 2, 8
N = 300
FP = "sha256:" + "cd" * 32


# -- helpers ------------------------------------------------------------------------------------------------
def save_random(path: Path, n: int = N, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                heads: int = HEADS, head_dim: int = HEAD_DIM):
    keys, values = random_kv(LAYERS, n, heads, head_dim, dtype, seed=seed)
    kvfast.save_kv(path, keys, values, random_ids(n, seed=seed + 1), fingerprint=FP, chunk_tokens=CHUNK)
    return path, keys, values


def make_cache(n: int, block_size: int = 16, dtype=torch.bfloat16, layout: str = "NHD", *, heads: int = HEADS,
               head_dim: int = HEAD_DIM) -> kvfast.PagedKVCache:
    """A cache with a busy first block and random bytes everywhere (the same bytes for every call)."""
    cache = kvfast.PagedKVCache(LAYERS, heads, head_dim, num_blocks=-(-n // block_size) + 3, block_size=block_size,
                                dtype=dtype, layout=layout)
    g = torch.Generator().manual_seed(123)
    raw = cache.storage.view(torch.uint8)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=g, dtype=torch.uint8))
    cache.append_slots(cache.new_sequence(), 1)  # another sequence holds block 0
    return cache


def both_paths(path, n: int, block_size: int, dtype, layout: str, **native_options):
    """Load ``path`` with the Python path and the native path into two identical caches; both must be equal."""
    ref = make_cache(n, block_size, dtype, layout)
    out = make_cache(n, block_size, dtype, layout)
    common = {key: native_options.pop(key) for key in ("num_tokens", "verify") if key in native_options}
    a = kvfast.load(path, ref, fingerprint=FP, backend="python", **common)
    b = kvfast.load(path, out, fingerprint=FP, backend="native", **common, **native_options)
    assert a.block_table == b.block_table and a.num_tokens == b.num_tokens
    assert torch.equal(ref.storage.view(torch.uint8), out.storage.view(torch.uint8))
    return out, b


def assert_holds(cache, seq, keys, values, n):
    for layer in range(LAYERS):
        k, v = cache.gather(seq, layer)
        assert torch.equal(k.view(torch.uint8), keys[layer][:n].contiguous().view(torch.uint8)), f"layer {layer} K"
        assert torch.equal(v.view(torch.uint8), values[layer][:n].contiguous().view(torch.uint8)), f"layer {layer} V"


def odirect_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


def method_or_skip(method: str, path: Path) -> str:
    if method == "odirect" and not odirect_supported(path):
        pytest.skip(f"{path.parent} does not support O_DIRECT")
    return method



# -- bit-exact: the native path against the Python reference ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_native_equals_python(dtype, layout, block_size, tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N, dtype, seed=block_size)
    cache, seq = both_paths(path, N, block_size, dtype, layout)
    assert_holds(cache, seq, keys, values, N)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_method_and_thread_count(method, threads, layout, tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N, torch.float16, seed=threads)
    cache, seq = both_paths(path, N, 16, torch.float16, layout, method=method_or_skip(method, path),
                            threads=threads)
    assert_holds(cache, seq, keys, values, N)


@pytest.mark.parametrize("n", DOC_LENGTHS)
@pytest.mark.parametrize("method", METHODS)
def test_partial_last_chunks(n, method, tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", n, torch.float32, seed=n)
    cache, seq = both_paths(path, n, 16, torch.float32, "NHD", method=method_or_skip(method, path), threads=2)
    assert_holds(cache, seq, keys, values, n)


@pytest.mark.parametrize("num_tokens", PREFIXES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_prefix_loads(num_tokens, layout, method, tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N, torch.bfloat16, seed=5)
    cache, seq = both_paths(path, N, 16, torch.bfloat16, layout, method=method_or_skip(method, path), threads=2,
                            num_tokens=num_tokens)
    assert_holds(cache, seq, keys, values, num_tokens)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_head_shapes(method, layout, tmp_path):
    """3 heads x head_dim 5 in float16: 10-byte head rows, 30-byte token rows, nothing aligned to anything."""
    path, keys, values = save_random(tmp_path / "doc.kvf", 201, torch.float16, seed=4, heads=3, head_dim=5)
    method_or_skip(method, path)
    caches = []
    for backend, extra in (("python", {}), ("native", {"method": method, "threads": 2})):
        cache = make_cache(201, 7, torch.float16, layout, heads=3, head_dim=5)
        seq = kvfast.load(path, cache, fingerprint=FP, backend=backend, **extra)
        caches.append(cache)
    assert torch.equal(caches[0].storage.view(torch.uint8), caches[1].storage.view(torch.uint8))
    assert_holds(caches[1], seq, keys, values, 201)


def test_verify_off_and_on_load_the_same_bytes(tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N, torch.bfloat16, seed=6)
    cache, seq = both_paths(path, N, 16, torch.bfloat16, "NHD", verify=False)
    assert_holds(cache, seq, keys, values, N)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [1, 16])
def test_wide_rows_and_many_pieces(layout, block_size, tmp_path):
    """128-byte head rows (the streaming-store path) and 256-token chunks of 256 KiB: with block_size 1, 512
    iovecs per chunk over several preadv calls of piece_bytes."""
    keys, values = random_kv(LAYERS, 600, 4, 32, torch.float32, seed=9)
    path = kvfast.save_kv(tmp_path / "doc.kvf", keys, values, random_ids(600), fingerprint=FP, chunk_tokens=256)
    for method in METHODS:
        cache = kvfast.PagedKVCache(LAYERS, 4, 32, num_blocks=600 // block_size + 1, block_size=block_size,
                                    dtype=torch.float32, layout=layout)
        seq = kvfast.load(path, cache, fingerprint=FP, backend="native", method=method_or_skip(method, path))
        assert_holds(cache, seq, keys, values, 600)


def test_strided_destination_pages(tmp_path):
    """The binding takes any strides with a contiguous last axis: pages with padding between heads and blocks."""
    path, keys, values = save_random(tmp_path / "doc.kvf", 100, torch.float32, seed=8)
    head_bytes = HEAD_DIM * 4
    block_size, num_blocks = 16, 8
    table = np.array([5, 2, 7, 0, 3, 1, 6], dtype=np.int64)
    # [num_blocks, block_size, H, head_bytes] views into padded buffers: 3 heads' room for 2, 40 bytes per 32
    padded = [[np.zeros((num_blocks + 1, block_size, HEADS + 1, head_bytes + 8), np.uint8) for _ in range(2)]
              for _ in range(LAYERS)]
    dests = [tuple(p[1:, :, :HEADS, :head_bytes] for p in pair) for pair in padded]
    with kvfast.open(path) as reader:
        chunks = np.array([(c.index, c.layer, c.start, c.stop, c.offset, c.length, c.crc32c) for c in reader.chunks])
        job = native.LoadJob(reader._fd, chunks, dests, table, 100, method="preadv", threads=2)
        assert job.wait() and job.error() is None
    for layer in range(LAYERS):
        for kv, want in enumerate((keys[layer], values[layer])):
            got = dests[layer][kv][table].reshape(-1, HEADS, head_bytes)[:100]  # [tokens, H, head_bytes]
            assert np.array_equal(got, want.contiguous().view(torch.uint8).numpy().reshape(100, HEADS, head_bytes))
        for pages in padded[layer]:  # nothing written outside the views: spare block, spare head, padding bytes
            assert not pages[0].any() and not pages[:, :, HEADS:].any() and not pages[..., head_bytes:].any()


# -- bad input: the same exceptions as the Python path ------------------------------------------------------
def _fails_alike(path: Path, exc_type, method: str, **options) -> BaseException:
    """Both paths raise ``exc_type`` and give every block back; returns the native path's exception."""
    errors = []
    for backend, extra in (("python", {}), ("native", {"method": method, **options})):
        cache = make_cache(N)
        free = cache.num_free_blocks
        with pytest.raises(exc_type) as info:
            kvfast.load(path, cache, fingerprint=FP, backend=backend, **extra)
        assert cache.num_free_blocks == free, f"{backend}: blocks not given back"
        assert str(path) in str(info.value)
        errors.append(info.value)
    return errors[1]


@pytest.mark.parametrize("where", TRUNCATE_AT)
@pytest.mark.parametrize("method", METHODS)
def test_file_truncated_after_open(where, method, tmp_path):
    # 1 KiB token rows: chunks of 128 KiB (the last 88 KiB), so a chunk can lose whole pages or half of one
    path, *_ = save_random(tmp_path / "doc.kvf", N, torch.float32, heads=4, head_dim=64)
    method_or_skip(method, path)
    with kvfast.open(path) as reader:  # validated against the full size; the file shrinks afterwards
        first, last = reader.chunks[0], reader.chunks[-1]
        size = {"first-chunk": first.offset + first.length // 2,
                "last-chunk-page": last.offset + 4096,
                "last-chunk-mid-page": last.offset + last.length - 100}[where]
        os.truncate(path, size)
        for backend, extra in (("python", {}), ("native", {"method": method, "threads": 2})):
            cache = make_cache(N, 16, torch.float32, heads=4, head_dim=64)
            free = cache.num_free_blocks
            with pytest.raises(TruncatedFileError) as info:
                kvfast.load(reader, cache, fingerprint=FP, backend=backend, **extra)
            assert cache.num_free_blocks == free
    chunk = first if where == "first-chunk" else last
    assert str(path) in str(info.value) and f"chunk {chunk.index} " in str(info.value)
    if method == "mmap" and where != "last-chunk-mid-page":  # whole pages gone: the SIGBUS guard caught it
        assert "SIGBUS" in str(info.value)


@pytest.mark.parametrize("where", FLIPPED)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flipped_bit_names_the_chunk(where, method, layout, tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", N)
    method_or_skip(method, path)
    with kvfast.open(path) as reader:
        chunk = {"first": reader.chunks[0], "middle": reader.chunks[len(reader.chunks) // 2],
                 "last": reader.chunks[-1]}[where]
        flip_bit(path, chunk.offset + chunk.length - 1, bit=7)  # after open: the file changes underneath
        messages = []
        for backend, extra in (("python", {}), ("native", {"method": method, "threads": 2})):
            cache = make_cache(N, layout=layout)
            free = cache.num_free_blocks
            with pytest.raises(ChecksumError) as info:
                kvfast.load(reader, cache, fingerprint=FP, backend=backend, **extra)
            assert cache.num_free_blocks == free
            messages.append(str(info.value))
    assert messages[0] == messages[1]  # word for word what KvfReader.read_chunk says
    assert f"chunk {chunk.index} (layer {chunk.layer}, tokens {chunk.start}:{chunk.stop})" in messages[1]


@pytest.mark.parametrize("threads", THREADS)
def test_two_damaged_chunks_name_the_first(threads, tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", N)
    with kvfast.open(path) as reader:
        early, late = reader.chunks[3], reader.chunks[4]
    flip_bit(path, late.offset)
    flip_bit(path, early.offset + early.length - 1)
    for _ in range(5):  # whichever worker finishes first, the error is the one a sequential reader meets
        err = _fails_alike(path, ChecksumError, "preadv", threads=threads)
        assert f"chunk {early.index} " in str(err)


def test_verify_false_loads_a_flipped_bit_like_the_python_path(tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N)
    with kvfast.open(path) as reader:
        chunk = reader.chunk(1, 100)
    flip_bit(path, chunk.offset + 3, bit=2)
    cache, seq = both_paths(path, N, 16, torch.bfloat16, "NHD", verify=False)
    k, _ = cache.gather(seq, 1)
    assert not torch.equal(k.view(torch.uint8), keys[1].view(torch.uint8))


def test_refusals_before_any_block_is_taken(tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", N)
    cache = make_cache(N)
    free = cache.num_free_blocks
    for options, exc_type in (({"backend": "gpu"}, ValueError), ({"method": "aio"}, ValueError),
                              ({"backend": "python", "method": "mmap"}, ValueError),
                              ({"threads": 0}, ValueError), ({"threads": 1.5}, ValueError)):
        with pytest.raises(exc_type):
            kvfast.load(path, cache, fingerprint=FP, **options)
    assert cache.num_free_blocks == free


def test_odirect_on_a_filesystem_without_it_is_an_os_error(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    target = shm / f"kvfast-test-{os.getpid()}.kvf"
    shutil.copy(save_random(tmp_path / "doc.kvf")[0], target)
    try:
        if odirect_supported(target):
            pytest.skip("tmpfs supports O_DIRECT on this kernel (Linux >= 6.6)")
        cache = make_cache(N)
        free = cache.num_free_blocks
        with pytest.raises(OSError, match="O_DIRECT"):
            kvfast.load(target, cache, fingerprint=FP, backend="native", method="odirect")
        assert cache.num_free_blocks == free
    finally:
        target.unlink(missing_ok=True)


# -- mutated files: a correct load or a KvfastError, never anything else ------------------------------------
_SMALL = {}


def _small_document(folder: Path) -> tuple[bytes, list[torch.Tensor], list[torch.Tensor]]:
    if not _SMALL:
        path, keys, values = save_random(folder / "small.kvf", 100, torch.bfloat16, seed=11)
        _SMALL.update(data=path.read_bytes(), keys=keys, values=values)
    return _SMALL["data"], _SMALL["keys"], _SMALL["values"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
    after_open=st.booleans(),
    method=st.sampled_from(METHODS),
    threads=st.sampled_from(THREADS),
)
def test_mutated_files_load_correctly_or_raise_kvfast_errors(tmp_path, flips, cut, after_open, method, threads):
    data, keys, values = _small_document(tmp_path)
    path = tmp_path / "mutated.kvf"
    path.write_bytes(data)
    if method == "odirect" and not odirect_supported(path):
        method = "preadv"

    def mutate():
        with open(path, "r+b") as f:
            for where, xor in flips:
                f.seek(int(where * len(data)))
                byte = f.read(1)[0]
                f.seek(int(where * len(data)))
                f.write(bytes([byte ^ xor]))
        if cut is not None:
            os.truncate(path, int(cut * len(data)))

    cache = make_cache(100)
    free = cache.num_free_blocks
    try:
        if after_open:  # validated first, then the file changes underneath the native reader
            with kvfast.open(path) as reader:
                mutate()
                seq = kvfast.load(reader, cache, fingerprint=FP, backend="native", method=method, threads=threads)
        else:
            mutate()
            seq = kvfast.load(path, cache, fingerprint=FP, backend="native", method=method, threads=threads)
    except KvfastError:
        assert cache.num_free_blocks == free
        return
    assert_holds(cache, seq, keys, values, 100)


# -- load_async -----------------------------------------------------------------------------------------------
BACKENDS = ["native", "python"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_async_layers_become_ready_in_order(backend, tmp_path):
    keys, values = random_kv(LAYERS, 2000, 4, 64, torch.float32, seed=12)
    path = kvfast.save_kv(tmp_path / "doc.kvf", keys, values, random_ids(2000), fingerprint=FP, chunk_tokens=64)
    cache = kvfast.PagedKVCache(LAYERS, 4, 64, num_blocks=130, block_size=16, dtype=torch.float32)
    fd = os.open(path, os.O_RDONLY)  # out of the page cache: a slower load shows more states in between
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    handle = kvfast.load_async(path, cache, fingerprint=FP, backend=backend, threads=1)
    assert handle.backend == backend and handle.sequence.num_tokens == 2000
    seen = []
    while not handle.done():  # one worker: the layers ready at any moment are always a prefix 0..k
        # asked last layer first: a layer seen ready implies every earlier one is seen ready after it
        ready = [handle.layer_ready(layer) for layer in reversed(range(LAYERS))][::-1]
        assert ready == sorted(ready, reverse=True), ready
        seen.append(sum(ready))
        time.sleep(0.0002)  # let the Python path's thread have the GIL
    assert seen == sorted(seen)  # readiness only grows
    for layer in range(LAYERS):
        handle.wait_layer(layer)
        assert handle.layer_ready(layer)
        k, v = cache.gather(handle.sequence, layer)  # usable as soon as its layer is ready
        assert torch.equal(k, keys[layer]) and torch.equal(v, values[layer])
    assert handle.wait() is handle.sequence
    assert handle.wait() is handle.sequence  # idempotent


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_async_failure_frees_blocks_once(backend, tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", N)
    with kvfast.open(path) as reader:
        bad = reader.chunk(2, 0)
    flip_bit(path, bad.offset + 7)
    cache = make_cache(N)
    free = cache.num_free_blocks
    handle = kvfast.load_async(path, cache, fingerprint=FP, backend=backend, threads=2)
    with pytest.raises(ChecksumError, match=f"chunk {bad.index} "):
        handle.wait_layer(LAYERS - 1)  # the last layer is never ready: the wait ends with the load's error
    for call in (handle.wait, lambda: handle.layer_ready(0), lambda: handle.wait_layer(0)):
        with pytest.raises(ChecksumError):
            call()
    assert handle.done()
    assert cache.num_free_blocks == free  # freed once: a second free would have raised in the allocator
    assert handle.sequence.num_tokens == 0 and handle.sequence.block_table == []


def test_load_async_outlives_the_reader_it_was_given(tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N)
    cache = make_cache(N)
    with kvfast.open(path) as reader:
        handle = kvfast.load_async(reader, cache, fingerprint=FP, backend="native")
    assert reader._fd < 0  # closed; the native job reads through its own descriptor
    assert_holds(cache, handle.wait(), keys, values, N)


def test_load_async_rejects_bad_layers_and_times_out_politely(tmp_path):
    path, keys, values = save_random(tmp_path / "doc.kvf", N)
    cache = make_cache(N)
    handle = kvfast.load_async(path, cache, fingerprint=FP)
    with pytest.raises(IndexError):
        handle.layer_ready(LAYERS)
    with pytest.raises(IndexError):
        handle.wait_layer(-1)
    deadline = time.monotonic() + 30
    while not handle.done() and time.monotonic() < deadline:
        try:
            handle.wait(timeout=0.001)
        except TimeoutError:
            continue
    assert_holds(cache, handle.wait(timeout=30), keys, values, N)


# -- crc32c: the fast tiers against the reference package ---------------------------------------------------
CRC_SIZES = [0, 1, 7, 8, 255, 256, 511, 512, 513, 1000, 4096, 24576, 32768 + 3, 1 << 20]
CRC_OFFSETS = [0, 1, 13]


@pytest.mark.parametrize("size", CRC_SIZES)
@pytest.mark.parametrize("offset", CRC_OFFSETS)
def test_crc32c_matches_the_reference_package(size, offset):
    crc32c_pkg = pytest.importorskip("crc32c")
    data = np.random.default_rng(size).integers(0, 256, size + offset, dtype=np.uint8)[offset:]
    assert native.crc32c(data) == crc32c_pkg.crc32c(data.tobytes())
    seed = 0x12345678
    assert native.crc32c(data, seed) == crc32c_pkg.crc32c(data.tobytes(), seed)
    half = size // 2
    assert native.crc32c(data[half:], native.crc32c(data[:half])) == native.crc32c(data)
