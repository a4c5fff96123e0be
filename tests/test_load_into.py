"""kvfast.load_into: a document into pages the caller owns, at the blocks it names, allocating nothing.

Plain tensors in NHD and HND, a vLLM-style packed tensor (K and V side by side in each token's row) and a layout
whose D has a stride; every backend; prefixes that end inside a block. The named blocks hold bitwise the file's KV,
every other byte of the pages is untouched, and bad block ids are refused before anything is written. The store's
``load_into`` adds trust, the RAM tier and the ledger on top.
"""
from __future__ import annotations

import pytest
import torch

import kvfast
from kvfast.errors import PagesError, SignatureError, TokenMismatchError
from tests.conftest import random_kv

FP = "sha256:" + "cd" * 32
LAYERS, HEADS, DIM, BLOCK, BLOCKS = 3, 2, 8, 16, 9
DTYPES = [torch.float32, torch.bfloat16]
BACKENDS = ["native", "python"]
NUM_TOKENS = [1, 16, 37, 64]  # one token, one whole block, a partial last block, the whole document
ORDER = [6, 0, 3, 8]  # the caller's blocks, out of order and with gaps


def nhd(dtype):
    return [torch.full((BLOCKS, BLOCK, HEADS, DIM), -1.0, dtype=dtype) for _ in range(LAYERS)]


def hnd(dtype):
    return [torch.full((BLOCKS, HEADS, BLOCK, DIM), -1.0, dtype=dtype) for _ in range(LAYERS)]


def packed(dtype):
    """K and V side by side in one [blocks, block, H, 2D] tensor per layer, as FlashAttention-style engines do."""
    return [torch.full((BLOCKS, BLOCK, HEADS, 2 * DIM), -1.0, dtype=dtype) for _ in range(LAYERS)]


def make_pages(kind: str, dtype) -> tuple[kvfast.KVPages, list[torch.Tensor]]:
    """Pages of ``kind`` and the tensors that own their memory (compared whole afterwards)."""
    if kind == "packed":
        owners = packed(dtype)
        return kvfast.KVPages([t[..., :DIM] for t in owners], [t[..., DIM:] for t in owners], layout="NHD"), owners
    if kind == "d-strided":  # each block keeps K as [D, block]: rows of D are not contiguous (vLLM CPU's K)
        owners = [torch.full((BLOCKS, HEADS, DIM, BLOCK), -1.0, dtype=dtype) for _ in range(2 * LAYERS)]
        views = [t.transpose(2, 3) for t in owners]
        return kvfast.KVPages(views[:LAYERS], views[LAYERS:], layout="HND"), owners
    keys, values = (nhd(dtype), nhd(dtype)) if kind == "NHD" else (hnd(dtype), hnd(dtype))
    return kvfast.KVPages(keys, values, layout=kind), keys + values


@pytest.fixture
def doc(tmp_path):
    def make(dtype, num_tokens=64):
        keys, values = random_kv(LAYERS, num_tokens, HEADS, DIM, dtype, seed=7)
        path = kvfast.save_kv(tmp_path / f"doc-{dtype}.kvf", keys, values, list(range(num_tokens)), fingerprint=FP,
                              chunk_tokens=16)
        return path, keys, values
    return make


def expected(kind: str, dtype, keys, values, n: int) -> list[torch.Tensor]:
    """What the owners must hold: the file's tokens at the named blocks, -1 everywhere else."""
    pages, owners = make_pages(kind, dtype)
    slots = pages.slot_mapping(torch.tensor(ORDER), 0, n)
    for layer in range(LAYERS):
        kvfast.cache.ops.scatter_kv(keys[layer][:n], values[layer][:n], pages.keys[layer], pages.values[layer],
                                    slots, layout=pages.layout)
    return owners


@pytest.mark.parametrize("kind", ["NHD", "HND", "packed", "d-strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", NUM_TOKENS)
def test_fills_named_blocks_bitwise_and_nothing_else(doc, kind, dtype, backend, n):
    if backend == "native" and kvfast.backend()["io"] != "native":
        pytest.skip("native extension not built")
    path, keys, values = doc(dtype)
    pages, owners = make_pages(kind, dtype)
    handle = kvfast.load_into(path, pages, ORDER, fingerprint=FP, num_tokens=n, backend=backend)
    assert handle.done() and handle.num_tokens == n and handle.sequence is None and handle.backend == backend
    for got, want in zip(owners, expected(kind, dtype, keys, values, n)):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    k, v = pages.gather(LAYERS - 1, ORDER, n)
    assert torch.equal(k, keys[-1][:n]) and torch.equal(v, values[-1][:n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_asynchronous_load_into_settles_like_a_blocking_one(doc, backend):
    if backend == "native" and kvfast.backend()["io"] != "native":
        pytest.skip("native extension not built")
    path, keys, values = doc(torch.bfloat16)
    pages, owners = make_pages("HND", torch.bfloat16)
    handle = kvfast.load_into(path, pages, ORDER, fingerprint=FP, backend=backend, blocking=False)
    handle.wait_layer(0)
    assert handle.wait() is None
    for got, want in zip(owners, expected("HND", torch.bfloat16, keys, values, 64)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("block_ids,message", [
    ([6, 0, 3], "need 4 blocks"),  # too few for 64 tokens
    ([6, 0, 3, BLOCKS], f"block id {BLOCKS} is outside"),
    ([6, 0, -1, 8], "block id -1 is outside"),
    ([6, 0, 6, 8], "block id 6 is named twice"),  # two token ranges into one block
    ([[6, 0], [3, 8]], "1-D"),
    ([6.0, 0.0, 3.0, 8.0], "ints"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_block_ids_are_refused_before_anything_is_written(doc, block_ids, message, backend):
    path, *_ = doc(torch.float32)
    pages, owners = make_pages("NHD", torch.float32)
    with pytest.raises(PagesError, match=message):
        kvfast.load_into(path, pages, block_ids, fingerprint=FP, backend=backend)
    assert all(bool((t == -1).all()) for t in owners)


def test_the_loaders_checks_run_before_anything_is_written(doc):
    path, *_ = doc(torch.float32)
    pages, owners = make_pages("NHD", torch.float32)
    with pytest.raises(kvfast.ModelMismatchError):
        kvfast.load_into(path, pages, ORDER, fingerprint="sha256:" + "00" * 32)
    with pytest.raises(TokenMismatchError, match="position 5"):
        kvfast.load_into(path, pages, ORDER, fingerprint=FP, num_tokens=10, token_ids=[0, 1, 2, 3, 4, 9, 6, 7, 8, 9])
    wrong_dtype, _ = make_pages("NHD", torch.bfloat16)
    with pytest.raises(kvfast.DtypeMismatchError):
        kvfast.load_into(path, wrong_dtype, ORDER, fingerprint=FP)
    assert all(bool((t == -1).all()) for t in owners)


def test_a_paged_cache_is_taken_as_its_pages_and_its_allocator_is_not_touched(doc):
    path, keys, values = doc(torch.float32)
    cache = kvfast.PagedKVCache(LAYERS, HEADS, DIM, num_blocks=BLOCKS, block_size=BLOCK, dtype=torch.float32)
    kvfast.load_into(path, cache, ORDER, fingerprint=FP)
    assert cache.num_free_blocks == BLOCKS
    k, v = cache.pages.gather(1, ORDER, 64)
    assert torch.equal(k, keys[1]) and torch.equal(v, values[1])


def test_load_is_allocate_then_load_into(doc):
    path, keys, values = doc(torch.bfloat16)
    cache = kvfast.PagedKVCache(LAYERS, HEADS, DIM, num_blocks=BLOCKS, block_size=BLOCK, dtype=torch.bfloat16)
    seq = kvfast.load(path, cache, fingerprint=FP)
    pages, _ = make_pages("NHD", torch.bfloat16)
    kvfast.load_into(path, pages, seq.block_table, fingerprint=FP)
    for layer in range(LAYERS):
        assert torch.equal(cache.key_cache(layer), torch.where(cache.key_cache(layer) == 0, 0, pages.keys[layer]))
        assert torch.equal(cache.gather(seq, layer)[0], pages.gather(layer, seq.block_table, 64)[0])


# -- through the store: trust, RAM tier, ledger -----------------------------------------------------------------
def test_store_load_into_reads_through_ram_and_records_every_load(doc, tmp_path):
    path, keys, values = doc(torch.float32)
    store = kvfast.Store(tmp_path / "store")
    entry = store.put(path)
    tiers = []
    for _ in range(2):
        pages, owners = make_pages("HND", torch.float32)
        handle = store.load_into(entry.key, pages, ORDER, list(range(37)), blocking=False)
        handle.wait()
        tiers.append(handle.method)
        for got, want in zip(owners, expected("HND", torch.float32, keys, values, 37)):
            assert torch.equal(got, want)
    assert tiers == ["disk", "ram"]  # read through: the second load is one copy from memory
    records = list(store.ledger.records())
    assert [(r["tier"], r["tokens"]) for r in records] == [("disk", 37), ("ram", 37)]
    assert store.ledger.verify().ok
    stats = store.stats()
    assert stats.hits["disk"] == 1 and stats.hits["ram"] == 1 and stats.tokens_reused == 74


def test_store_load_into_without_ram_loads_asynchronously_and_records_on_landing(doc, tmp_path):
    path, keys, values = doc(torch.float32)
    store = kvfast.Store(tmp_path / "store", ram_bytes=0)
    entry = store.put(path)
    pages, owners = make_pages("NHD", torch.float32)
    handle = store.load_into(entry.key, pages, ORDER, list(range(64)), blocking=False)
    handle.wait()
    assert handle.method != "ram" and [r["tier"] for r in store.ledger.records()] == ["disk"]
    for got, want in zip(owners, expected("NHD", torch.float32, keys, values, 64)):
        assert torch.equal(got, want)


def test_store_load_into_refuses_untrusted_entries_and_other_tokens(doc, tmp_path):
    path, *_ = doc(torch.float32)
    entry = kvfast.Store(tmp_path / "store").put(path)
    kvfast.keygen(tmp_path / "k.key")
    trusting = kvfast.Store(tmp_path / "store", trusted_keys=[tmp_path / "k.key.pub"])
    pages, owners = make_pages("NHD", torch.float32)
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        trusting.load_into(entry.key, pages, ORDER, list(range(64)))
    with pytest.raises(TokenMismatchError):
        kvfast.Store(tmp_path / "store").load_into(entry.key, pages, ORDER, [5] * 64)
    with pytest.raises(KeyError, match="no entry"):
        kvfast.Store(tmp_path / "store").load_into((FP, "0" * 64), pages, ORDER, list(range(64)))
    assert all(bool((t == -1).all()) for t in owners)
    assert list(trusting.ledger.records()) == []
