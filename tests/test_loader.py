"""kvfast.load (the Python reference path): .kvf file -> paged cache, bit-exact, or a refusal that changes nothing.

Files come from ``kvfast.save_kv`` with random KV and from ``kvfast.publish`` of tiny real models. Every refusal
must name the file and leave the cache's free block count where it was.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.errors import (
    CacheFullError,
    ChecksumError,
    DtypeMismatchError,
    ModelMismatchError,
    ShapeMismatchError,
    TokenMismatchError,
)
from tests.conftest import flip_bit, random_ids, random_kv, tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 16, 256]
DOC_LENGTHS = [1, 63, 65, 300]  # chunk_tokens is 64: one partial chunk, one short, one over, several
PREFIXES = [1, 5, 63, 64, 65, 100, 256, 299, 300]  # inside chunks, on chunk and block boundaries, whole
CHUNK = 64
LAYERS, HEADS, HEAD_DIM = 3, 2, 8
FP = "sha256:" + "ab" * 32  # a stand-in fingerprint for files of random KV


# -- helpers ------------------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def save_random(path: Path, n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-KV file of ``n`` tokens; returns (path, keys, values, token_ids)."""
    keys, values = random_kv(LAYERS, n, HEADS, HEAD_DIM, dtype, seed=seed)
    ids = random_ids(n, seed=seed + 1)
    kvfast.save_kv(path, keys, values, ids, fingerprint=FP, chunk_tokens=CHUNK)
    return path, keys, values, ids


def make_cache(num_blocks: int, block_size: int = 16, dtype=torch.float32, layout: str = "NHD", *,
               layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM) -> kvfast.PagedKVCache:
    return kvfast.PagedKVCache(layers, heads, head_dim, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                               layout=layout)


def assert_holds(cache, seq, keys, values, n=None):
    n = seq.num_tokens if n is None else n
    assert seq.num_tokens == n
    assert len(seq.block_table) == cache.blocks_for(n)
    for layer, (k, v) in enumerate(zip(keys, values)):
        gk, gv = cache.gather(seq, layer)
        assert torch.equal(bits(gk), bits(k[:n])), f"layer {layer} K differs"
        assert torch.equal(bits(gv), bits(v[:n])), f"layer {layer} V differs"



# -- bit-exact loads of random KV ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("n", DOC_LENGTHS)
def test_load_is_bit_exact(dtype, layout, block_size, n, tmp_path):
    path, keys, values, ids = save_random(tmp_path / "doc.kvf", n, dtype, seed=n)
    cache = make_cache(-(-n // block_size) + 1, block_size, dtype, layout)
    seq = kvfast.load(path, cache, fingerprint=FP, token_ids=ids)
    assert_holds(cache, seq, keys, values, n)
    assert cache.num_used_blocks == cache.blocks_for(n)


@pytest.mark.parametrize("num_tokens", PREFIXES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefix_load(num_tokens, layout, tmp_path):
    path, keys, values, ids = save_random(tmp_path / "doc.kvf", 300, torch.bfloat16, seed=3)
    cache = make_cache(40, 8, torch.bfloat16, layout)
    seq = kvfast.load(path, cache, fingerprint=FP, num_tokens=num_tokens, token_ids=ids[:num_tokens])
    assert_holds(cache, seq, keys, values, num_tokens)
    assert cache.num_used_blocks == cache.blocks_for(num_tokens)


@pytest.mark.parametrize("num_tokens", [0, 301, -1])
def test_prefix_out_of_range_is_refused(num_tokens, tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", 300)
    cache = make_cache(40)
    with pytest.raises(ValueError, match="num_tokens"):
        kvfast.load(path, cache, fingerprint=FP, num_tokens=num_tokens)
    assert cache.num_free_blocks == 40


def test_load_from_an_open_reader_leaves_it_open(tmp_path):
    path, keys, values, _ = save_random(tmp_path / "doc.kvf", 70)
    cache = make_cache(10)
    with kvfast.open(path) as reader:
        a = kvfast.load(reader, cache, fingerprint=FP)
        b = kvfast.load(reader, cache, fingerprint=FP, num_tokens=33)  # still usable
    assert_holds(cache, a, keys, values, 70)
    assert_holds(cache, b, keys, values, 33)


def test_two_documents_share_a_cache_without_disturbing_each_other(tmp_path):
    pa, ka, va, _ = save_random(tmp_path / "a.kvf", 65, seed=10)
    pb, kb, vb, _ = save_random(tmp_path / "b.kvf", 300, seed=20)
    cache = make_cache(30, 16)
    a = kvfast.load(pa, cache, fingerprint=FP)
    b = kvfast.load(pb, cache, fingerprint=FP)
    assert not set(a.block_table) & set(b.block_table)
    assert cache.num_used_blocks == 5 + 19
    assert_holds(cache, a, ka, va)
    assert_holds(cache, b, kb, vb)
    # free a, load it again (into a's old blocks and more): b is untouched
    cache.free(a)
    a2 = kvfast.load(pa, cache, fingerprint=FP, num_tokens=64)
    assert_holds(cache, a2, ka, va, 64)
    assert_holds(cache, b, kb, vb)
    # a forked reader of b sees b; freeing everything returns the cache to all-free
    reader = cache.fork(b)
    cache.free(a2)
    cache.free(b)
    assert_holds(cache, reader, kb, vb)
    cache.free(reader)
    assert cache.num_free_blocks == cache.num_blocks == 30
    assert not cache.allocator.refcount.any()


# -- files of real models -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_published_document(arch, dtype, tmp_path):
    model = tiny_model(arch, dtype)
    ids = random_ids(130, seed=5)
    path = kvfast.publish(model, ids, tmp_path / "doc.kvf", chunk_tokens=CHUNK, prefill_chunk=48)
    keys, values = kvfast.capture_kv(model, ids, prefill_chunk=48)  # what prefill produced, independently
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=14, block_size=16, layout="HND")
    seq = kvfast.load(path, cache, model=model, token_ids=ids)
    assert_holds(cache, seq, keys, values, 130)
    prefix = kvfast.load(path, cache, model=model, num_tokens=70)
    assert_holds(cache, prefix, keys, values, 70)
    assert cache.num_free_blocks == 0  # 9 + 5 blocks: the cache is exactly full


# -- refusals -----------------------------------------------------------------------------------------
@pytest.fixture
def published(tmp_path):
    """A float32 llama document of 100 tokens: (model, path, ids)."""
    model = tiny_model("llama", torch.float32, seed=0)
    ids = random_ids(100, seed=7)
    path = kvfast.publish(model, ids, tmp_path / "doc.kvf", chunk_tokens=CHUNK)
    return model, path, ids


def _busy_cache(model, num_blocks=16):
    """A cache of ``model`` with one unrelated sequence already in it (so 'unchanged' is not just 'empty')."""
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=16)
    other = cache.new_sequence()
    cache.append_slots(other, 20)
    return cache


def _refused(exc_type, path, cache, call):
    free = cache.num_free_blocks
    with pytest.raises(exc_type) as info:
        call()
    assert str(path) in str(info.value), f"message does not name the file: {info.value}"
    assert cache.num_free_blocks == free
    return info.value


def test_refuses_without_model_or_fingerprint(published):
    model, path, _ = published
    cache = _busy_cache(model)
    _refused(TypeError, path, cache, lambda: kvfast.load(path, cache))


def test_refuses_without_model_or_fingerprint_leaves_cache(published):
    model, path, _ = published
    cache = _busy_cache(model)
    with pytest.raises(TypeError, match="model= or fingerprint="):
        kvfast.load(path, cache)
    assert cache.num_free_blocks == 14


def test_refuses_other_weights(published):
    _, path, _ = published
    other = tiny_model("llama", torch.float32, seed=1)  # same config, other weights
    cache = _busy_cache(other)
    err = _refused(ModelMismatchError, path, cache, lambda: kvfast.load(path, cache, model=other))
    assert type(err) is ModelMismatchError
    assert "other weights" in str(err)
    # the same refusal when only the fingerprint is given
    err = _refused(ModelMismatchError, path, cache,
                   lambda: kvfast.load(path, cache, fingerprint=kvfast.fingerprint(other)))
    assert type(err) is ModelMismatchError


def test_refuses_other_config(published):
    _, path, _ = published
    other = tiny_model("llama", torch.float32, seed=0, rope_theta=500000.0)  # same weights, other RoPE
    cache = _busy_cache(other)
    err = _refused(ModelMismatchError, path, cache, lambda: kvfast.load(path, cache, model=other))
    assert "rope_parameters" in str(err) and "other weights" not in str(err)


def test_refuses_model_in_another_dtype(published):
    model, path, _ = published
    half = tiny_model("llama", torch.float16, seed=0)
    cache = _busy_cache(model)  # float32, like the file: only the model is off
    err = _refused(DtypeMismatchError, path, cache, lambda: kvfast.load(path, cache, model=half))
    assert "float16" in str(err) and "float32" in str(err)


def test_refuses_cache_of_another_dtype(published):
    model, path, _ = published
    cache = make_cache(16, dtype=torch.bfloat16, layers=2, heads=2, head_dim=16)  # the file's shape, not its dtype
    err = _refused(DtypeMismatchError, path, cache,
                   lambda: kvfast.load(path, cache, fingerprint=kvfast.fingerprint(model)))
    assert "bfloat16" in str(err) and "float32" in str(err)
    assert cache.num_free_blocks == 16


@pytest.mark.parametrize("shape", [(3, 2, 16), (2, 1, 16), (2, 2, 8)], ids=["layers", "kv_heads", "head_dim"])
def test_refuses_cache_of_another_shape(published, shape):
    model, path, _ = published
    layers, heads, head_dim = shape
    cache = make_cache(16, layers=layers, heads=heads, head_dim=head_dim)
    err = _refused(ShapeMismatchError, path, cache, lambda: kvfast.load(path, cache, model=model))
    assert str(shape) in str(err)


@pytest.mark.parametrize("position", [0, 37, 99])
def test_refuses_other_token_ids(published, position):
    model, path, ids = published
    cache = _busy_cache(model)
    wrong = list(ids)
    wrong[position] = (wrong[position] + 1) % 256
    err = _refused(TokenMismatchError, path, cache, lambda: kvfast.load(path, cache, model=model, token_ids=wrong))
    assert f"position {position}" in str(err)
    # a prefix load checks only the prefix: a difference past it does not matter
    if position > 0:
        seq = kvfast.load(path, cache, model=model, num_tokens=position, token_ids=wrong[:position])
        assert seq.num_tokens == position


def test_refuses_token_ids_of_another_length(published):
    model, path, ids = published
    cache = _busy_cache(model)
    _refused(TokenMismatchError, path, cache, lambda: kvfast.load(path, cache, model=model, token_ids=ids[:-1]))


@pytest.mark.parametrize("where", ["first", "last"])
def test_refuses_a_flipped_bit_and_gives_blocks_back(tmp_path, where):
    path, keys, values, _ = save_random(tmp_path / "doc.kvf", 300, seed=30)
    with kvfast.open(path) as r:
        chunk = r.chunks[0] if where == "first" else r.chunks[-1]  # the last: after most blocks were written
    flip_bit(path, chunk.offset + chunk.length // 3, bit=5)
    cache = make_cache(40, 16)
    other = cache.new_sequence()
    cache.append_slots(other, 40)
    free, counts = cache.num_free_blocks, cache.allocator.refcount.copy()
    with pytest.raises(ChecksumError) as info:
        kvfast.load(path, cache, fingerprint=FP)
    assert str(path) in str(info.value) and f"chunk {chunk.index}" in str(info.value)
    assert cache.num_free_blocks == free
    assert (cache.allocator.refcount == counts).all()
    # the cache works as before: a clean copy of the file loads fine into the given-back blocks
    clean, *_ = save_random(tmp_path / "clean.kvf", 300, seed=30)
    assert_holds(cache, kvfast.load(clean, cache, fingerprint=FP), keys, values, 300)


def test_prefix_load_does_not_read_a_damaged_chunk_past_the_prefix(tmp_path):
    path, keys, values, _ = save_random(tmp_path / "doc.kvf", 300, seed=31)
    with kvfast.open(path) as r:
        damaged = r.chunk(1, 200)  # layer 1, tokens 192:256
    flip_bit(path, damaged.offset)
    cache = make_cache(40)
    seq = kvfast.load(path, cache, fingerprint=FP, num_tokens=192)
    assert_holds(cache, seq, keys, values, 192)
    with pytest.raises(ChecksumError):
        kvfast.load(path, cache, fingerprint=FP, num_tokens=193)


def test_verify_false_trusts_the_bytes(tmp_path):
    """verify=False is the trust switch: a flipped bit is not caught, and lands in the cache as is."""
    path, keys, values, _ = save_random(tmp_path / "doc.kvf", 300, seed=32)
    with kvfast.open(path) as r:
        chunk = r.chunk(2, 70)  # layer 2, tokens 64:128
    byte_in_chunk = chunk.length // 2 + 5  # in V (the second half), somewhere in the middle
    flip_bit(path, chunk.offset + byte_in_chunk, bit=3)
    cache = make_cache(40)
    with pytest.raises(ChecksumError):
        kvfast.load(path, cache, fingerprint=FP)
    seq = kvfast.load(path, cache, fingerprint=FP, verify=False)
    # expected: the saved V of layer 2 with that one bit flipped; everything else equal
    expected_v = bits(values[2]).clone().view(-1)
    row_bytes = HEADS * HEAD_DIM * 4
    expected_v[chunk.start * row_bytes + byte_in_chunk - chunk.length // 2] ^= 1 << 3
    _, gv = cache.gather(seq, 2)
    assert not torch.equal(bits(gv).view(-1), bits(values[2]).view(-1))
    assert torch.equal(bits(gv).view(-1), expected_v)
    assert_holds(cache, seq, keys[:2], values[:2], 300)
    gk, _ = cache.gather(seq, 2)
    assert torch.equal(bits(gk), bits(keys[2]))


def test_cache_full_is_refused_and_changes_nothing(tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", 300)
    cache = make_cache(20, 16)  # 300 tokens need 19 blocks
    other = cache.new_sequence()
    cache.append_slots(other, 17)  # leaves 18
    free = cache.num_free_blocks
    with pytest.raises(CacheFullError) as info:
        kvfast.load(path, cache, fingerprint=FP)
    assert cache.num_free_blocks == free
    assert "num_blocks" in str(info.value)
    # it fits once the other sequence is gone
    cache.free(other)
    assert kvfast.load(path, cache, fingerprint=FP).num_tokens == 300


def test_cache_full_names_the_file(tmp_path):
    path, *_ = save_random(tmp_path / "doc.kvf", 300)
    cache = make_cache(18, 16)
    _refused(CacheFullError, path, cache, lambda: kvfast.load(path, cache, fingerprint=FP))


def test_refusals_happen_before_any_file_descriptor_leaks(published):
    """A refused load closes the file it opened (no fd left behind per refusal)."""
    model, path, ids = published
    cache = _busy_cache(model)
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("no /proc/self/fd on this system")
    before = len(os.listdir(fd_dir))
    for _ in range(5):
        with pytest.raises(TokenMismatchError):
            kvfast.load(path, cache, model=model, token_ids=[0] * 100)
    assert len(os.listdir(fd_dir)) == before
