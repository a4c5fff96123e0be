"""PagedKVCache, BlockAllocator and the reference kernels in kvfast.cache.ops: layout, exact copies, sharing.

Copies are compared bit for bit (``.view(torch.uint8)``) on random bit patterns, so NaN payloads, -0.0 and
subnormals must survive too. Sizes include ones that are not multiples of the block size.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfast
from kvfast.cache import ops
from kvfast.errors import CacheFullError, KvfastError
from kvfast.cache.paged import BlockAllocator, PagedKVCache
from tests.conftest import ARCHITECTURES, tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 16, 256]
NUM_TOKENS = [1, 17, 255, 300]  # none a multiple of 16 or 256; 1 is one partial block
LAYERS, HEADS, HEAD_DIM = 2, 3, 8  # 3 heads: not a power of two


# -- helpers ------------------------------------------------------------------------------------------
def random_bits(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are uniformly random (NaNs, infinities, subnormals included)."""
    g = torch.Generator().manual_seed(seed)
    n = int(np.prod(shape)) * dtype.itemsize
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).view(*shape)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def make_cache(*, num_blocks: int, block_size: int, dtype=torch.float32, layout="NHD") -> PagedKVCache:
    return PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=num_blocks, block_size=block_size, dtype=dtype,
                        layout=layout)


def fill(cache: PagedKVCache, seq, n: int, seed: int):
    """Append ``n`` random-bit tokens to ``seq`` in every layer; returns per-layer (K, V), each ``[n, H, D]``."""
    slots = cache.append_slots(seq, n)
    kv = []
    for layer in range(cache.num_layers):
        k = random_bits(n, HEADS, HEAD_DIM, dtype=cache.dtype, seed=seed * 1000 + 2 * layer)
        v = random_bits(n, HEADS, HEAD_DIM, dtype=cache.dtype, seed=seed * 1000 + 2 * layer + 1)
        cache.write(layer, slots, k, v)
        kv.append((k, v))
    return kv


def page_row(cache: PagedKVCache, which: int, layer: int, block: int, offset: int) -> torch.Tensor:
    """Token ``offset`` of block ``block`` by direct indexing of the documented layout, ``[H, D]``."""
    pages = cache.key_cache(layer) if which == 0 else cache.value_cache(layer)
    return pages[block, offset] if cache.layout == "NHD" else pages[block, :, offset]


def assert_seq_holds(cache: PagedKVCache, seq, kv) -> None:
    """``seq`` holds exactly ``kv`` (per layer (K, V)), read both through gather and by direct indexing."""
    n = seq.num_tokens
    for layer, (k, v) in enumerate(kv):
        gk, gv = cache.gather(seq, layer)
        assert_bits_equal(gk, k[:n])
        assert_bits_equal(gv, v[:n])
        for p in range(n):
            block, offset = seq.block_table[p // cache.block_size], p % cache.block_size
            assert torch.equal(bits(page_row(cache, 0, layer, block, offset)), bits(k[p]))
            assert torch.equal(bits(page_row(cache, 1, layer, block, offset)), bits(v[p]))


# -- scatter / gather round trip ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_write_then_gather_is_bit_exact(dtype, layout, block_size, num_tokens):
    cache = make_cache(num_blocks=-(-num_tokens // block_size) + 2, block_size=block_size, dtype=dtype,
                       layout=layout)
    seq = cache.new_sequence()
    kv = fill(cache, seq, num_tokens, seed=1)
    assert seq.num_tokens == num_tokens
    assert len(seq.block_table) == -(-num_tokens // block_size)
    for layer, (k, v) in enumerate(kv):
        gk, gv = cache.gather(seq, layer)
        assert gk.is_contiguous() and gv.is_contiguous()
        assert_bits_equal(gk, k)
        assert_bits_equal(gv, v)
        # a window [start, stop) that straddles block boundaries
        start, stop = num_tokens // 3, num_tokens - num_tokens // 4
        wk, wv = cache.gather(seq, layer, start, stop)
        assert_bits_equal(wk, k[start:stop])
        assert_bits_equal(wv, v[start:stop])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_in_pieces_equals_write_at_once(layout):
    """Appending 1 + 20 + 37 tokens gives the same pages as appending 58 in one go."""
    whole, parts = (make_cache(num_blocks=8, block_size=16, layout=layout) for _ in range(2))
    k = random_bits(58, HEADS, HEAD_DIM, dtype=torch.float32, seed=2)
    v = random_bits(58, HEADS, HEAD_DIM, dtype=torch.float32, seed=3)
    a = whole.new_sequence()
    whole.write(0, whole.append_slots(a, 58), k, v)
    b = parts.new_sequence()
    pos = 0
    for n in (1, 20, 37):
        parts.write(0, parts.append_slots(b, n), k[pos : pos + n], v[pos : pos + n])
        pos += n
    assert a.block_table == b.block_table
    assert torch.equal(bits(whole.storage), bits(parts.storage))


def test_write_refuses_another_dtype():
    cache = make_cache(num_blocks=2, block_size=4, dtype=torch.bfloat16)
    seq = cache.new_sequence()
    slots = cache.append_slots(seq, 3)
    k = torch.randn(3, HEADS, HEAD_DIM)  # float32
    before = cache.storage.clone()
    with pytest.raises(TypeError, match="never converts"):
        cache.write(0, slots, k, k)
    assert torch.equal(bits(cache.storage), bits(before))


# -- storage layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_layer_views_have_the_vllm_and_flashinfer_shapes(layout, block_size):
    cache = make_cache(num_blocks=5, block_size=block_size, layout=layout)
    want = (5, block_size, HEADS, HEAD_DIM) if layout == "NHD" else (5, HEADS, block_size, HEAD_DIM)
    for layer in range(LAYERS):
        for pages in (cache.key_cache(layer), cache.value_cache(layer)):
            assert tuple(pages.shape) == want
            # contiguous, so a kernel that assumes the documented strides reads the right bytes
            assert pages.is_contiguous()
        assert cache.key_cache(layer).data_ptr() != cache.value_cache(layer).data_ptr()
    # K and V of every layer are distinct memory
    ptrs = {cache.key_cache(i).data_ptr() for i in range(LAYERS)} | {cache.value_cache(i).data_ptr()
                                                                     for i in range(LAYERS)}
    assert len(ptrs) == 2 * LAYERS


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_token_lives_where_the_block_table_says(layout, block_size):
    """Position p of a sequence sits at ``pages[block_table[p // bs], p % bs]`` (NHD) / ``[.., :, p % bs]`` (HND)."""
    n = 2 * block_size + 3
    cache = make_cache(num_blocks=8, block_size=block_size, layout=layout)
    other = cache.new_sequence()
    fill(cache, other, 1, seed=9)  # takes block 0, so the sequence under test starts elsewhere
    seq = cache.new_sequence()
    kv = fill(cache, seq, n, seed=4)
    assert 0 not in seq.block_table
    slots = cache.slot_mapping(seq)
    pos = torch.arange(n)
    table = torch.tensor(seq.block_table)
    assert torch.equal(slots, table[pos // block_size] * block_size + pos % block_size)
    assert_seq_holds(cache, seq, kv)
    # and nothing else was written: every slot outside the two sequences is still zero
    used = set(seq.block_table) | set(other.block_table)
    for b in range(cache.num_blocks):
        if b not in used:
            assert not bits(cache.storage[:, :, b]).any()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_kv_doc_example_and_strided_sources(layout):
    """ops.scatter_kv takes slots directly; sources may be strided views."""
    nb, bs = 4, 16
    shape = (nb, bs, HEADS, HEAD_DIM) if layout == "NHD" else (nb, HEADS, bs, HEAD_DIM)
    kc, vc = torch.zeros(shape), torch.zeros(shape)
    big = random_bits(3, HEADS, 2 * HEAD_DIM, dtype=torch.float32, seed=5)
    k, v = big[:, :, ::2], big[:, :, 1::2]  # non-contiguous views
    assert not k.is_contiguous()
    ops.scatter_kv(k, v, kc, vc, torch.tensor([17, -1, 0]), layout=layout)
    # expected pages, built by direct indexing; token 1 (slot -1) goes nowhere
    want_k, want_v = torch.zeros(shape), torch.zeros(shape)
    for want, src in ((want_k, k), (want_v, v)):
        for token, (block, offset) in ((0, (1, 1)), (2, (0, 0))):
            if layout == "NHD":
                want[block, offset] = src[token]
            else:
                want[block, :, offset] = src[token]
    assert torch.equal(bits(kc), bits(want_k))
    assert torch.equal(bits(vc), bits(want_v))


def test_check_layout_refuses_unknown_layouts():
    with pytest.raises(ValueError, match="layout"):
        ops.check_layout("NDH")
    with pytest.raises(ValueError, match="layout"):
        PagedKVCache(1, 1, 1, num_blocks=1, layout="nhd")


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_constructor_refuses_sizes_that_are_not_positive_ints(bad):
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 1, 1, num_blocks=1, block_size=bad)


# -- slot_mapping -1 (padding) -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_slots_are_skipped(layout, dtype):
    cache = make_cache(num_blocks=6, block_size=4, dtype=dtype, layout=layout)
    seq = cache.new_sequence()
    old = fill(cache, seq, 19, seed=6)  # every slot of 5 blocks holds known bits
    before = cache.storage.clone()
    slots = cache.slot_mapping(seq)
    keep = torch.tensor([i % 3 != 1 for i in range(19)])
    padded = torch.where(keep, slots, torch.full_like(slots, -1))
    k = random_bits(19, HEADS, HEAD_DIM, dtype=dtype, seed=7)
    v = random_bits(19, HEADS, HEAD_DIM, dtype=dtype, seed=8)
    cache.write(1, padded, k, v)
    # expected: layer 1 takes the new tokens where kept, the old ones elsewhere; layer 0 untouched.
    # Selected on bytes, so no float operation can touch NaN payloads.
    k1 = torch.where(keep[:, None, None, None], bits(k).view(19, HEADS, HEAD_DIM, -1),
                     bits(old[1][0]).view(19, HEADS, HEAD_DIM, -1)).view(-1).view(dtype).view(k.shape)
    v1 = torch.where(keep[:, None, None, None], bits(v).view(19, HEADS, HEAD_DIM, -1),
                     bits(old[1][1]).view(19, HEADS, HEAD_DIM, -1)).view(-1).view(dtype).view(v.shape)
    assert_seq_holds(cache, seq, [old[0], (k1, v1)])
    assert torch.equal(bits(cache.storage[0]), bits(before[0]))
    # the unused slot (block 4, offset 3) and the free block 5 are untouched too
    assert torch.equal(bits(cache.storage[:, :, 5]), bits(before[:, :, 5]))


def test_all_padding_writes_nothing():
    cache = make_cache(num_blocks=2, block_size=4)
    seq = cache.new_sequence()
    fill(cache, seq, 5, seed=10)
    before = cache.storage.clone()
    k = random_bits(3, HEADS, HEAD_DIM, dtype=torch.float32, seed=11)
    cache.write(0, torch.full((3,), -1), k, k)
    assert torch.equal(bits(cache.storage), bits(before))


# -- non-monotonic block tables -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_scattered_block_tables(layout, block_size):
    """Interleaved growth and frees hand out blocks out of order; data still lands and reads back exactly."""
    cache = make_cache(num_blocks=24, block_size=block_size, layout=layout)
    a, b, c = cache.new_sequence(), cache.new_sequence(), cache.new_sequence()
    for step in range(4):  # a, b, c take turns, one block each
        for i, s in enumerate((a, b, c)):
            fill(cache, s, block_size, seed=40 + 3 * step + i)
    kept_c = [(cache.gather(c, layer)) for layer in range(LAYERS)]
    cache.free(a)
    cache.free(b)
    d = cache.new_sequence()
    n = 7 * block_size + (block_size // 2 or 1)  # a partial last block when block_size > 1
    kv = fill(cache, d, n, seed=30)
    table = d.block_table
    assert len(set(table)) == len(table)
    assert table != sorted(table), f"expected a non-monotonic block table, got {table}"
    assert not set(table) & set(c.block_table)
    assert_seq_holds(cache, d, kv)
    # c was not disturbed
    for layer, (k, v) in enumerate(kept_c):
        gk, gv = cache.gather(c, layer)
        assert_bits_equal(gk, k)
        assert_bits_equal(gv, v)


def test_slot_mapping_and_gather_reject_out_of_range():
    cache = make_cache(num_blocks=4, block_size=4)
    seq = cache.new_sequence()
    fill(cache, seq, 6, seed=12)
    with pytest.raises(IndexError):
        cache.slot_mapping(seq, 0, 7)
    with pytest.raises(IndexError):
        cache.gather(seq, 0, 4, 3)
    with pytest.raises(ValueError):
        cache.append_slots(seq, -1)


# -- BlockAllocator -----------------------------------------------------------------------------------
def test_allocator_counts_and_free_list():
    alloc = BlockAllocator(5)
    assert alloc.num_free == 5
    first = alloc.allocate(2)
    assert first == [0, 1]  # low ids first
    assert alloc.refcount.tolist() == [1, 1, 0, 0, 0]
    alloc.incref([1])
    alloc.decref([0, 1])
    assert alloc.refcount.tolist() == [0, 1, 0, 0, 0]
    assert alloc.num_free == 4  # block 0 came back, block 1 is still held
    alloc.decref([1])
    assert alloc.num_free == 5 and not alloc.refcount.any()
    with pytest.raises(RuntimeError, match="freed more often"):
        alloc.decref([3])


def test_allocator_is_all_or_nothing():
    alloc = BlockAllocator(3)
    alloc.allocate(2)
    counts, free = alloc.refcount.copy(), alloc.num_free
    with pytest.raises(CacheFullError) as info:
        alloc.allocate(2)
    assert isinstance(info.value, KvfastError) and isinstance(info.value, MemoryError)
    assert "num_blocks" in str(info.value)  # says what to do
    assert alloc.num_free == free and np.array_equal(alloc.refcount, counts)
    assert alloc.allocate(1) == [2]
    assert alloc.allocate(0) == []


# -- sharing: fork, copy on write, free ---------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fork_shares_blocks_without_copying(layout):
    cache = make_cache(num_blocks=8, block_size=4, layout=layout)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 10, seed=13)
    used, before = cache.num_used_blocks, cache.storage.clone()
    child = cache.fork(parent)
    assert child.seq_id != parent.seq_id
    assert child.block_table == parent.block_table and child.block_table is not parent.block_table
    assert child.num_tokens == 10
    assert cache.num_used_blocks == used
    assert torch.equal(bits(cache.storage), bits(before))
    assert all(cache.allocator.refcount[b] == 2 for b in parent.block_table)
    assert_seq_holds(cache, child, kv)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_on_write_into_shared_partial_block(layout, dtype):
    cache = make_cache(num_blocks=8, block_size=4, dtype=dtype, layout=layout)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 10, seed=14)  # blocks [0, 1, 2], the last one holds 2 of 4 tokens
    child = cache.fork(parent)
    parent_pages = cache.storage[:, :, parent.block_table].clone()
    used = cache.num_used_blocks
    new = fill(cache, child, 1, seed=15)  # fits in the shared partial block: must copy it first
    assert cache.num_used_blocks == used + 1
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    assert cache.allocator.refcount[parent.block_table[2]] == 1
    assert cache.allocator.refcount[child.block_table[2]] == 1
    assert all(cache.allocator.refcount[b] == 2 for b in parent.block_table[:2])
    # the parent's pages are bitwise what they were; the child sees the parent's 10 tokens then its own
    assert torch.equal(bits(cache.storage[:, :, parent.block_table]), bits(parent_pages))
    assert_seq_holds(cache, parent, kv)
    joined = [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(kv, new)]
    assert_seq_holds(cache, child, joined)
    # a second append into the (now private) block copies nothing more
    more = fill(cache, child, 1, seed=16)
    assert cache.num_used_blocks == used + 1
    joined = [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(joined, more)]
    assert_seq_holds(cache, child, joined)
    assert_seq_holds(cache, parent, kv)


def test_parent_appending_after_fork_does_not_leak_into_child():
    cache = make_cache(num_blocks=8, block_size=4)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 6, seed=17)
    child = cache.fork(parent)
    fill(cache, parent, 3, seed=18)  # the parent writes into the shared partial block: copy on write
    assert child.num_tokens == 6
    assert_seq_holds(cache, child, kv)
    assert parent.block_table[0] == child.block_table[0]
    assert parent.block_table[1] != child.block_table[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_copy_when_shared_last_block_is_full(layout):
    cache = make_cache(num_blocks=8, block_size=4, layout=layout)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 8, seed=19)  # two full blocks
    child = cache.fork(parent)
    before = cache.storage.clone()
    used = cache.num_used_blocks
    new = fill(cache, child, 3, seed=20)
    assert cache.num_used_blocks == used + 1  # one fresh block, no copy
    assert child.block_table[:2] == parent.block_table
    assert all(cache.allocator.refcount[b] == 2 for b in parent.block_table)
    assert torch.equal(bits(cache.storage[:, :, parent.block_table]), bits(before[:, :, parent.block_table]))
    assert_seq_holds(cache, parent, kv)
    joined = [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(kv, new)]
    assert_seq_holds(cache, child, joined)


def test_fork_of_a_prefix_shares_only_its_blocks():
    cache = make_cache(num_blocks=8, block_size=4)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 11, seed=21)  # blocks [0, 1, 2]
    child = cache.fork(parent, num_tokens=6)  # covers blocks 0 and half of 1
    assert child.num_tokens == 6 and child.block_table == parent.block_table[:2]
    assert cache.allocator.refcount[parent.block_table].tolist() == [2, 2, 1]
    new = fill(cache, child, 1, seed=22)  # writes position 6, inside the parent's block 1: copy on write
    assert child.block_table[1] != parent.block_table[1]
    assert_seq_holds(cache, parent, kv)
    joined = [(torch.cat([k[:6], nk]), torch.cat([v[:6], nv])) for (k, v), (nk, nv) in zip(kv, new)]
    assert_seq_holds(cache, child, joined)
    with pytest.raises(ValueError):
        cache.fork(parent, num_tokens=12)


def test_free_returns_blocks_only_when_the_last_holder_frees():
    cache = make_cache(num_blocks=8, block_size=4)
    parent = cache.new_sequence()
    fill(cache, parent, 10, seed=23)
    blocks = list(parent.block_table)
    child = cache.fork(parent)
    grandchild = cache.fork(child)
    assert cache.num_free_blocks == 5
    assert cache.allocator.refcount[blocks].tolist() == [3, 3, 3]
    cache.free(parent)
    assert parent.block_table == [] and parent.num_tokens == 0
    assert cache.num_free_blocks == 5
    cache.free(grandchild)
    assert cache.num_free_blocks == 5
    assert cache.allocator.refcount[blocks].tolist() == [1, 1, 1]
    cache.free(child)
    assert cache.num_free_blocks == 8 and not cache.allocator.refcount.any()
    cache.free(child)  # freeing an emptied sequence again is harmless
    assert cache.num_free_blocks == 8
    # the freed blocks are reused
    again = cache.new_sequence()
    cache.append_slots(again, 32)
    assert sorted(again.block_table) == list(range(8))


def _state(cache: PagedKVCache, *seqs):
    return (cache.num_free_blocks, cache.allocator.refcount.copy(), list(cache.allocator._free),
            [(list(s.block_table), s.num_tokens) for s in seqs], cache.storage.clone())


def _assert_same_state(a, b):
    assert a[0] == b[0]
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert a[3] == b[3]
    assert torch.equal(bits(a[4]), bits(b[4]))


def test_cache_full_leaves_sequence_and_allocator_unchanged():
    cache = make_cache(num_blocks=4, block_size=4)
    seq = cache.new_sequence()
    fill(cache, seq, 10, seed=24)  # 3 blocks, one free
    before = _state(cache, seq)
    with pytest.raises(CacheFullError):
        cache.append_slots(seq, 7)  # needs 2 more blocks
    _assert_same_state(_state(cache, seq), before)
    cache.append_slots(seq, 6)  # exactly fills the last free block: fine
    assert cache.num_free_blocks == 0 and seq.num_tokens == 16


def test_cache_full_during_copy_on_write_is_all_or_nothing():
    cache = make_cache(num_blocks=3, block_size=4)
    parent = cache.new_sequence()
    kv = fill(cache, parent, 10, seed=25)  # all 3 blocks, last one partial
    child = cache.fork(parent)
    before = _state(cache, parent, child)
    with pytest.raises(CacheFullError):
        cache.append_slots(child, 1)  # would need a copy of the shared block, and there is none free
    _assert_same_state(_state(cache, parent, child), before)
    assert_seq_holds(cache, child, kv)
    # once the parent lets go, the child owns the block and appends in place
    cache.free(parent)
    new = fill(cache, child, 2, seed=26)
    assert cache.num_free_blocks == 0
    joined = [(torch.cat([k, nk]), torch.cat([v, nv])) for (k, v), (nk, nv) in zip(kv, new)]
    assert_seq_holds(cache, child, joined)


# -- for_model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_for_model_matches_the_model(arch):
    model = tiny_model(arch, torch.bfloat16)
    attn = model.model.layers[0].self_attn
    cache = PagedKVCache.for_model(model, num_blocks=6, block_size=16, layout="HND")
    assert cache.num_layers == len(model.model.layers) == 2
    assert cache.num_kv_heads == 2
    assert cache.num_kv_heads * cache.head_dim == attn.k_proj.out_features == attn.v_proj.out_features
    assert cache.dtype == torch.bfloat16 and cache.device == model.device
    assert tuple(cache.key_cache(0).shape) == (6, cache.num_kv_heads, 16, cache.head_dim)
    assert cache.num_free_blocks == 6


def test_for_model_keeps_float32_and_nhd_default():
    model = tiny_model("llama", torch.float32)
    cache = PagedKVCache.for_model(model, num_blocks=3)
    assert cache.dtype == torch.float32 and cache.layout == "NHD" and cache.block_size == 16
    assert tuple(cache.value_cache(1).shape) == (3, 16, 2, 16)
    assert "PagedKVCache(" in repr(cache) and repr(cache) == repr(kvfast.PagedKVCache.for_model(model,
                                                                                                 num_blocks=3))


# -- random interleavings of new / fork / append / free -----------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["new", "fork", "append", "free"]), st.integers(0, 1000),
                         st.integers(0, 9)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ops_=OPS, layout=st.sampled_from(LAYOUTS))
def test_random_sharing_keeps_every_sequence_intact(ops_, layout):
    """Against a plain-list model: every live sequence reads back its own tokens, reference counts equal the
    number of holders, and a refused append (cache full) changes nothing."""
    cache = PagedKVCache(1, 1, 2, num_blocks=12, block_size=3, dtype=torch.float32, layout=layout)
    live: dict[int, tuple] = {}  # seq_id -> (seq, reference K [n, 1, 2], reference V)
    counter = 0
    for op, pick, n in ops_:
        seqs = list(live.values())
        if op == "new" or not seqs:
            seq = cache.new_sequence()
            live[seq.seq_id] = (seq, torch.empty(0, 1, 2), torch.empty(0, 1, 2))
            continue
        seq, k_ref, v_ref = seqs[pick % len(seqs)]
        if op == "fork":
            keep = pick % (seq.num_tokens + 1)
            child = cache.fork(seq, num_tokens=keep)
            live[child.seq_id] = (child, k_ref[:keep], v_ref[:keep])
        elif op == "free":
            cache.free(seq)
            del live[seq.seq_id]
        else:
            before = _state(cache, *(s for s, _, _ in live.values()))
            counter += 1
            k = random_bits(n, 1, 2, dtype=torch.float32, seed=counter)
            v = random_bits(n, 1, 2, dtype=torch.float32, seed=10_000 + counter)
            try:
                slots = cache.append_slots(seq, n)
            except CacheFullError:
                _assert_same_state(_state(cache, *(s for s, _, _ in live.values())), before)
                continue
            cache.write(0, slots, k, v)
            live[seq.seq_id] = (seq, torch.cat([k_ref, k]), torch.cat([v_ref, v]))
        holders = np.zeros(cache.num_blocks, dtype=np.int64)
        for s, k_ref, v_ref in live.values():
            assert s.num_tokens == len(k_ref) and len(s.block_table) == cache.blocks_for(s.num_tokens)
            np.add.at(holders, s.block_table, 1)
            gk, gv = cache.gather(s, 0)
            assert torch.equal(bits(gk), bits(k_ref)) and torch.equal(bits(gv), bits(v_ref))
        assert np.array_equal(cache.allocator.refcount, holders)
        assert cache.num_free_blocks == int((holders == 0).sum())
