"""kvfast.Store: content addressing, longest-prefix match, shared attach, tiers, crash safety, many processes.

KV in most tests is synthetic (``fake_kv``): a token's K and V depend only on its id and position, so, as
with a real model's KV for a causal prefix, two documents sharing a prefix share that prefix's KV, and
any attach can be checked bitwise against the prompt alone, whichever stored document served it.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache

import kvfast
import kvfast.store.tiers.disk
from kvfast.cli import main as cli_main
from kvfast.hf.generate import decode
from tests.conftest import random_ids, tiny_model

FP = "sha256:" + "5a" * 32  # a model fingerprint for synthetic KV
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
BLOCK = 16  # the store's block_tokens (default)


# -- helpers --------------------------------------------------------------------------------------------
def fake_kv(ids, *, layers=LAYERS, heads=HEADS, head_dim=HEAD_DIM, dtype=torch.float32):
    """Per-layer K and V ``[len(ids), heads, head_dim]``: a deterministic function of (token id, position)."""
    ids = torch.as_tensor(list(ids), dtype=torch.int64)
    pos = torch.arange(ids.numel())
    channel = torch.arange(heads * head_dim)
    out = []
    for t in range(2 * layers):
        x = (ids[:, None] * 2654435761 + pos[:, None] * 40503 + channel[None] * 97 + t * 7919) % (1 << 20)
        out.append((x.to(torch.float32) / (1 << 19) - 1).to(dtype).reshape(-1, heads, head_dim))
    return out[:layers], out[layers:]


def new_cache(num_blocks=256, *, layout="NHD", block_size=16, head_dim=HEAD_DIM):
    return kvfast.PagedKVCache(LAYERS, HEADS, head_dim, num_blocks=num_blocks, block_size=block_size,
                               dtype=torch.float32, layout=layout)


def holds(cache, seq, ids) -> bool:
    """Whether ``seq`` holds exactly the synthetic KV of ``ids[:seq.num_tokens]``, bit for bit."""
    keys, values = fake_kv(ids[: seq.num_tokens], head_dim=cache.head_dim)
    for layer in range(cache.num_layers):
        k, v = cache.gather(seq, layer)
        if not (torch.equal(k, keys[layer]) and torch.equal(v, values[layer])):
            return False
    return True


def put_fake(store, ids, *, head_dim=HEAD_DIM, chunk_tokens=64):
    return store.put(fake_kv(ids, head_dim=head_dim), token_ids=ids, fingerprint=FP, chunk_tokens=chunk_tokens)


def entry_is_sound(entry) -> bool:
    """The entry's file loads, every checksum holds, and its bytes are the synthetic KV of its tokens."""
    with kvfast.open(entry.path) as r:
        r.verify()
        ids = r.token_ids.tolist()
        keys, values = fake_kv(ids, head_dim=r.manifest.head_dim)
        return (r.manifest.fingerprint == entry.key.fingerprint and len(ids) == entry.num_tokens
                and kvfast.document_key(ids) == entry.key.document
                and all(torch.equal(a, b) for layer in range(r.manifest.num_layers)
                        for a, b in zip(r.read_layer(layer), (keys[layer], values[layer]))))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def forkserver():
    """Processes forked from a server that has imported kvfast: real processes, without a 3 s import each."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_store"])
    return ctx


# -- content addressing ---------------------------------------------------------------------------------
def test_put_get_list_remove(tmp_path):
    store = kvfast.Store(tmp_path / "root")
    a, b = random_ids(100, seed=1), random_ids(37, seed=2)
    ea, eb = put_fake(store, a), put_fake(store, b)
    assert ea.key == kvfast.StoreKey(FP, kvfast.document_key(a)) and ea.num_tokens == 100
    assert ea.path == tmp_path / "root" / ("sha256-" + "5a" * 32) / f"{ea.key.document}.kvf"
    assert store.get(ea.key) == ea and store.get((FP, eb.key.document)) == eb
    assert [e.key for e in store.list()] == sorted([ea.key, eb.key])
    assert store.list("sha256:" + "00" * 32) == []
    assert entry_is_sound(ea) and entry_is_sound(eb)
    assert store.remove(ea.key) and not store.remove(ea.key)
    assert store.get(ea.key) is None and not ea.path.exists() and [e.key for e in store.list()] == [eb.key]
    # another Store object (another process, a restart) rebuilds the same index from the folder alone
    assert [e.key for e in kvfast.Store(tmp_path / "root").list()] == [eb.key]


def test_readers_are_kept_open_until_their_file_changes(tmp_path):
    """A serving engine checks and loads a document per request: the parsed file is reused while it is the same
    file, and a file put again under the path (removed, then published anew) is opened anew."""
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(100, seed=1)
    entry = put_fake(store, ids)
    reader = store.reader(entry)
    assert store.reader(entry) is reader and reader.token_ids.tolist() == ids
    store.remove(entry.key)
    with pytest.raises(FileNotFoundError):
        store.reader(entry)
    again = put_fake(store, ids, chunk_tokens=32)  # the same key, another file
    fresh = store.reader(again)
    assert fresh is not reader and len(fresh.chunks) == 2 * len(reader.chunks)
    pages = kvfast.KVPages([torch.zeros(8, 16, HEADS, HEAD_DIM) for _ in range(LAYERS)],
                           [torch.zeros(8, 16, HEADS, HEAD_DIM) for _ in range(LAYERS)])
    store.load_into(again.key, pages, list(range(7)), ids)  # loads through the kept reader, which stays open
    assert store.reader(again) is fresh and fresh.token_ids.tolist() == ids
    keys, _ = fake_kv(ids)
    assert torch.equal(pages.gather(1, list(range(7)), 100)[0], keys[1])


def test_duplicate_publish_is_a_no_op(tmp_path):
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(200, seed=3)
    src = kvfast.save_kv(tmp_path / "doc.kvf", *fake_kv(ids), ids, fingerprint=FP)
    first = store.put(src)
    before = first.path.stat()
    assert store.put(src) == first
    assert put_fake(store, ids) == first  # the same document from tensors: same key, nothing written
    after = first.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    s = store.stats()
    assert (s.puts, s.duplicate_puts, s.entries) == (1, 2, 1)
    assert not any((tmp_path / "root" / ".tmp").iterdir())


def test_put_refuses_a_corrupted_file(tmp_path):
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(100, seed=4)
    src = kvfast.save_kv(tmp_path / "doc.kvf", *fake_kv(ids), ids, fingerprint=FP)
    with kvfast.open(src) as r:
        offset = r.chunks[1].offset + 5
    data = bytearray(src.read_bytes())
    data[offset] ^= 0x10
    src.write_bytes(bytes(data))
    with pytest.raises(kvfast.ChecksumError):
        store.put(src)
    assert store.list() == [] and not any((tmp_path / "root" / ".tmp").iterdir())


def test_root_settings_are_fixed_at_creation(tmp_path):
    kvfast.Store(tmp_path / "root", block_tokens=32)
    assert kvfast.Store(tmp_path / "root").block_tokens == 32
    with pytest.raises(ValueError, match="block_tokens=32"):
        kvfast.Store(tmp_path / "root", block_tokens=16)


# -- longest-prefix match -------------------------------------------------------------------------------
DOC_A = random_ids(100, seed=10)  # 6 full blocks + 4 tokens
DOC_B = DOC_A[:64] + random_ids(60, seed=11)  # shares A's first 4 blocks
DOC_C = random_ids(64, seed=12)  # block-aligned
DOC_D = random_ids(10, seed=13)  # shorter than one block
OTHER = random_ids(40, seed=14, vocab=1000)  # never in a document (ids >= 256 mostly)
MATCH_CASES = {  # prompt, acceptable documents, tokens covered
    "extend-whole-document": (DOC_A + OTHER[:5], ["A"], 100),  # partial last block included
    "extend-aligned-document": (DOC_C + OTHER[:5], ["C"], 64),
    "equal": (DOC_A, ["A"], 100),
    "truncate": (DOC_A[:90], ["A"], 80),
    "truncate-inside-first-block": (DOC_A[:10], [], 0),
    "diverge": (DOC_A[:85] + OTHER[:20], ["A"], 80),
    "diverge-other-branch": (DOC_B[:100] + OTHER[:3], ["B"], 96),
    "diverge-at-shared-prefix": (DOC_A[:70] + OTHER[:20], ["A", "B"], 64),
    "short-whole-document": (DOC_D + OTHER[:3], ["D"], 10),
    "no-common-prefix": (OTHER + DOC_A, [], 0),
}


@pytest.fixture(scope="module")
def match_store(tmp_path_factory):
    store = kvfast.Store(tmp_path_factory.mktemp("match") / "root")
    return store, {name: put_fake(store, ids).key for name, ids in
                   (("A", DOC_A), ("B", DOC_B), ("C", DOC_C), ("D", DOC_D))}


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_match_finds_the_longest_stored_prefix(match_store, case):
    store, keys = match_store
    prompt, docs, n = MATCH_CASES[case]
    m = store.match(FP, prompt)
    if not docs:
        assert m is None
        return
    assert m is not None and m.num_tokens == n and m.entry.key in [keys[d] for d in docs]
    # for another model, nothing matches
    assert store.match("sha256:" + "00" * 32, prompt) is None


@pytest.mark.parametrize("case", ["extend-whole-document", "truncate", "diverge-other-branch", "no-common-prefix"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_attach_holds_the_prefix_bitwise(match_store, case, layout):
    store, _ = match_store
    prompt, docs, n = MATCH_CASES[case]
    cache = new_cache(64, layout=layout, block_size=5)  # blocks not aligned with the store's 16-token blocks
    seq, reused = store.attach(FP, prompt, cache, min_rest=0)
    assert reused == n == seq.num_tokens and holds(cache, seq, prompt)
    seq2, reused2 = store.attach(FP, prompt + [7], cache)  # from the resident root: shares its blocks
    assert reused2 == n and seq2.block_table == seq.block_table and holds(cache, seq2, prompt)
    store.close()


def test_attach_leaves_min_rest_tokens_to_prefill(match_store):
    store, _ = match_store
    cache = new_cache(64)
    seq, n = store.attach(FP, DOC_A, cache)  # the whole prompt is stored; keep one token to run
    assert n == 99 and seq.num_tokens == 99 and holds(cache, seq, DOC_A)
    slots = cache.append_slots(seq, 1)  # the caller's own token: copy on write of the shared partial block
    k, v = fake_kv(DOC_A)
    for layer in range(LAYERS):
        cache.write(layer, slots, k[layer][99:], v[layer][99:])
    assert holds(cache, seq, DOC_A)
    root_copy, _ = store.attach(FP, DOC_A, cache, min_rest=0)
    assert holds(cache, root_copy, DOC_A) and root_copy.block_table[-1] != seq.block_table[-1]
    store.close()


# -- attach + prefill of the rest == scratch prefill ----------------------------------------------------
@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    model = tiny_model("llama", torch.float32)
    store = kvfast.Store(tmp_path_factory.mktemp("model") / "root")
    doc = random_ids(300, seed=20)
    store.publish(model, doc, chunk_tokens=64, prefill_chunk=128)
    return model, store, doc


ATTACH_PROMPTS = {  # prompt, tokens reused
    "extend": (random_ids(300, seed=20) + random_ids(16, seed=21), 300),
    "truncate": (random_ids(300, seed=20)[:200] + random_ids(16, seed=22), 192),
    "diverge": (random_ids(300, seed=20)[:150] + random_ids(20, seed=23, vocab=200) + random_ids(16, seed=24), 144),
}


def test_attach_extend_generate_is_token_exact_vs_scratch(model_store):
    model, store, _ = model_store
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=256)
    new_tokens = 16
    for case, (prompt, want) in ATTACH_PROMPTS.items():
        seq, n = store.attach(model, prompt, cache)
        assert n == want, case
        logits = kvfast.extend(model, cache, seq, prompt[n:])
        first = int(torch.argmax(logits))
        rest = kvfast.generate(model, cache, seq, [first], max_new_tokens=new_tokens - 1)
        tokens, ours = [first, *rest.tokens], torch.cat([logits.float()[None], rest.logits])
        scratch = decode(model, DynamicCache(), prompt, max_new_tokens=new_tokens)
        diff = (ours - scratch.logits).abs().max().item()
        print(f"\nstore attach {case}: reused {n}/{len(prompt)} tokens; vs scratch prefill "
              f"{sum(a == b for a, b in zip(tokens, scratch.tokens))}/{new_tokens} tokens, max |logit diff| {diff:.3g}")
        assert tokens == scratch.tokens, case
        assert diff < 1e-4, case
    s = store.stats()
    assert (s.hits["disk"], s.hits["device"]) == (1, 2)
    n_params = sum(p.numel() for p in model.parameters())
    assert s.tokens_reused == 300 + 192 + 144 and s.prefill_flops_saved == 2 * n_params * s.tokens_reused
    store.close()


def test_attach_is_bitwise_a_load_of_the_prefix(tmp_path):
    model = tiny_model("qwen3", torch.bfloat16)
    store = kvfast.Store(tmp_path / "root")
    doc, question = random_ids(300, seed=30), random_ids(16, seed=31)
    entry = store.publish(model, doc, chunk_tokens=64)
    prompt = doc[:250] + question
    a = kvfast.PagedKVCache.for_model(model, num_blocks=128)
    seq, n = store.attach(model, prompt, a)
    assert n == 240
    ours = kvfast.generate(model, a, seq, prompt[n:], max_new_tokens=16)
    b = kvfast.PagedKVCache.for_model(model, num_blocks=128)
    plain = kvfast.load(entry.path, b, model=model, num_tokens=n, token_ids=prompt[:n])
    theirs = kvfast.generate(model, b, plain, prompt[n:], max_new_tokens=16)
    assert ours.tokens == theirs.tokens and torch.equal(ours.logits, theirs.logits)
    # the model must match the stored KV
    with pytest.raises(kvfast.DtypeMismatchError):
        store.attach(model, prompt, kvfast.PagedKVCache(2, 2, a.head_dim, num_blocks=64, dtype=torch.float32))
    assert store.attach(tiny_model("qwen3", torch.bfloat16, seed=1), prompt, a)[1] == 0  # other weights


# -- many agents, one copy ------------------------------------------------------------------------------
def test_64_agents_share_one_copy_of_a_4096_token_document(tmp_path):
    # 4 layers x 4 KV heads x head_dim 32, float32: 4 KiB of KV per token, 16 MiB for the document
    model = tiny_model("llama", torch.float32, hidden_size=128, num_hidden_layers=4, num_key_value_heads=4,
                       max_position_embeddings=8192)
    doc = random_ids(4096, seed=40)
    store = kvfast.Store(tmp_path / "root", ram_bytes=64 << 20)
    entry = store.publish(model, doc, prefill_chunk=1024)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=256 + 64 + 8)
    questions = [random_ids(8, seed=100 + i) for i in range(64)]

    t0 = time.perf_counter()
    first, n = store.attach(model, doc + questions[0], cache)
    first_s = time.perf_counter() - t0
    assert n == 4096 and cache.num_used_blocks == 256
    rss0 = rss_bytes()
    agents, later_s = [first], []
    for q in questions[1:]:
        t0 = time.perf_counter()
        seq, n = store.attach(model, doc + q, cache)
        later_s.append(time.perf_counter() - t0)
        assert n == 4096
        agents.append(seq)
    rss_growth = rss_bytes() - rss0
    later = sorted(later_s)[len(later_s) // 2]
    print(f"\n64 agents x {entry.kv_bytes / 2**20:.0f} MiB document: first attach {first_s * 1e3:.2f} ms (disk), "
          f"later attaches median {later * 1e3:.3f} ms; cache blocks used {cache.num_used_blocks} "
          f"(one copy = 256); RSS growth over 63 attaches {rss_growth / 2**20:.2f} MiB")
    assert cache.num_used_blocks == 256  # one copy in the paged cache
    assert all(a.block_table == first.block_table for a in agents)
    assert rss_growth < entry.kv_bytes / 4  # no copy in host memory either (64 copies would be 1 GiB)
    s = store.stats()
    assert s.bytes_read["disk"] == entry.kv_bytes and s.bytes_read["ram"] == 0 and s.hits["device"] == 63
    assert later * 2 < first_s  # an attach after the first copies nothing: it costs a match and a fork

    # each agent prefills its own question into its own block
    for seq, q in zip(agents, questions):
        kvfast.extend(model, cache, seq, q)
    assert cache.num_used_blocks == 256 + 64
    k0, _ = cache.gather(agents[0], 0, 4096)
    k1, _ = cache.gather(agents[63], 0, 4096)
    assert not torch.equal(k0, k1)  # their own tokens went to their own blocks
    for seq in agents:
        cache.free(seq)
    assert cache.num_used_blocks == 256  # the store's resident root
    assert store.evict(cache) == 256 and cache.num_used_blocks == 0 and store.stats().ram_bytes == entry.kv_bytes


# -- tiers ----------------------------------------------------------------------------------------------
def test_each_tier_stays_within_its_budget(tmp_path):
    docs = [random_ids(100, seed=50 + i) for i in range(8)]  # 7 blocks of 16 tokens x 256 bytes each
    file_bytes = put_fake(kvfast.Store(tmp_path / "probe"), docs[0]).file_bytes
    ram_budget = 2 * 7 * 16 * 256 + 100  # the RAM tier keeps whole pages: room for two documents
    store = kvfast.Store(tmp_path / "root", device_blocks=16, ram_bytes=ram_budget, disk_bytes=5 * file_bytes)
    for i, ids in enumerate(docs):
        entry = put_fake(store, ids)
        s = store.stats()
        assert s.disk_bytes <= 5 * file_bytes and store.get(entry.key) == entry  # the newest is kept
        assert s.entries == min(i + 1, 5)
    assert store.stats().evictions["disk"] == 3
    stored = [ids for ids in docs if store.match(FP, ids) is not None]
    assert len(stored) == 5

    cache = new_cache(64)

    def within_budgets():
        s = store.stats()
        return store.device_blocks_used(cache) <= 16 and s.ram_bytes <= ram_budget

    rng = random.Random(0)
    for _ in range(30):
        ids = rng.choice(stored)
        seq, n = store.attach(FP, ids + [1], cache)
        assert n == 100 and holds(cache, seq, ids) and within_budgets()
        cache.free(seq)
    s = store.stats()
    assert s.hits["ram"] > 0 and s.evictions["device"] > 0 and s.evictions["ram"] > 0

    # a document in use is never evicted; over budget with everything in use, loads stay out of the tier
    held = [store.attach(FP, ids + [1], cache)[0] for ids in stored[:2]]
    resident = store.device_blocks_used(cache)
    for ids in stored[2:]:
        used = cache.num_used_blocks
        seq, n = store.attach(FP, ids + [1], cache)
        assert n == 100 and holds(cache, seq, ids) and within_budgets()
        cache.free(seq)
        assert cache.num_used_blocks == used  # nothing left behind
    assert store.device_blocks_used(cache) == resident == 14
    assert all(holds(cache, seq, ids) for seq, ids in zip(held, stored[:2]))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_ram_tier_returns_documents_bitwise_to_any_cache(tmp_path, layout):
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(100, seed=55)
    put_fake(store, ids)
    a = new_cache(64, layout=layout)
    seq, _ = store.attach(FP, ids, a, min_rest=0)
    a.free(seq)
    assert store.evict(a) == 7 and a.num_used_blocks == 0
    b = new_cache(64, layout="HND" if layout == "NHD" else "NHD", block_size=5)  # other page shape: converted
    seq, n = store.attach(FP, ids, b, min_rest=0)
    assert n == 100 and holds(b, seq, ids) and store.stats().hits == {"device": 0, "ram": 1, "disk": 1}
    b.free(seq)
    assert store.evict(b) == 20 and store.stats().ram_entries == 1  # the host copy was kept: nothing to copy
    seq, n = store.attach(FP, ids, a, min_rest=0)  # back into the first cache's page shape: page for page
    assert n == 100 and holds(a, seq, ids) and store.stats().hits["ram"] == 2


def test_disk_eviction_is_least_recently_used(tmp_path):
    docs = [random_ids(100, seed=60 + i) for i in range(3)]
    file_bytes = put_fake(kvfast.Store(tmp_path / "probe"), docs[0]).file_bytes
    store = kvfast.Store(tmp_path / "root", disk_bytes=3 * file_bytes)
    entries = [put_fake(store, ids) for ids in docs]
    for age, e in zip((300, 200, 100), entries):  # last used: docs[2] most recently, docs[0] least
        os.utime(e.path, (time.time() - age, time.time() - age))
    store.attach(FP, docs[0] + [1], new_cache(64))  # using docs[0] makes docs[1] the least recently used
    put_fake(store, random_ids(100, seed=63))
    assert [store.get(e.key) is not None for e in entries] == [True, False, True]


# -- crash safety and garbage collection ----------------------------------------------------------------
def test_leftovers_of_a_crash_are_invisible_and_gc_removes_them(tmp_path):
    store = kvfast.Store(tmp_path / "root")
    keep = put_fake(store, random_ids(50, seed=70))
    # a publish killed between its two renames leaves a .kvf without a sidecar
    orphan_ids = random_ids(60, seed=71)
    orphan = keep.path.parent / f"{kvfast.document_key(orphan_ids)}.kvf"
    kvfast.save_kv(orphan, *fake_kv(orphan_ids), orphan_ids, fingerprint=FP)
    # a publish killed while writing leaves a temp file named after its (now dead) process
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = proc.pid
    (tmp_path / "root" / ".tmp" / f"{dead}-00ff.kvf").write_bytes(b"partial")
    (tmp_path / "root" / ".tmp" / f".{dead}-00ff.kvf.abc.tmp").write_bytes(b"partial")
    # a sidecar damaged outside kvfast (a store never writes one in place)
    damaged = put_fake(store, random_ids(70, seed=74))
    damaged.path.with_suffix(".json").write_text("{not json")
    fresh = kvfast.Store(tmp_path / "root")
    with pytest.warns(RuntimeWarning, match="sidecar is invalid"):
        assert [e.key for e in fresh.list()] == [keep.key]
    assert fresh.match(FP, orphan_ids) is None
    report = fresh.gc(verify=True)
    assert report == {"temp_files": 2, "orphans": 1, "corrupt": 1, "evicted": 0, "entries": 1,
                      "disk_bytes": keep.file_bytes}
    assert not orphan.exists() and not damaged.path.exists() and entry_is_sound(keep)


def test_a_corrupted_entry_is_set_aside(tmp_path):
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(100, seed=72)
    entry = put_fake(store, ids)
    data = bytearray(entry.path.read_bytes())
    data[-3] ^= 0x01  # bit rot in the last chunk
    entry.path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="checksum"):
        seq, n = store.attach(FP, ids + [1], new_cache(64))
    assert n == 0 and store.list() == [] and store.stats().corrupt == 1
    other = put_fake(store, random_ids(100, seed=73))
    data = bytearray(other.path.read_bytes())
    data[-3] ^= 0x01
    other.path.write_bytes(bytes(data))
    assert store.gc(verify=True)["corrupt"] == 1 and store.list() == []


def test_an_entry_whose_file_vanished_under_attach_is_forgotten_not_raised(tmp_path):
    """Another process removes a document between this store's match and its open (the .kvf goes first): the
    attach serves what is left to match, as it would had the remove come a moment earlier."""
    store = kvfast.Store(tmp_path / "root")
    ids = random_ids(100, seed=74)
    entry = put_fake(store, ids)
    entry.path.unlink()  # the sidecar is still there: the index still offers the entry
    seq, n = store.attach(FP, ids + [1], new_cache(64))
    assert (n, seq.num_tokens) == (0, 0)
    with pytest.raises(FileNotFoundError) as info:  # kvfast's own error, still the exception Python code expects
        kvfast.open(entry.path)
    assert isinstance(info.value, kvfast.FileAccessError) and f"{entry.path}: opening: no such file" in str(info.value)


KILL_DOCS = [random_ids(1024 + 96 * i, seed=80 + i) for i in range(10)]  # ~1-2 MiB files: writes take time
KILL_HEAD_DIM = 64
FAILPOINTS = ["put:written", "put:sidecar-written", "put:kvf-renamed", "put:committed", "remove:uncommitted"]


def _publisher(root: str, seed: int, failpoint: str | None, ready) -> None:
    """Publish and remove documents in a random order, forever (until killed)."""
    torch.set_num_threads(1)
    if failpoint is not None:
        def hook(name: str) -> None:
            if name == failpoint:
                os.kill(os.getpid(), signal.SIGKILL)
        kvfast.store.tiers.disk._failpoint_hook = hook
    store = kvfast.Store(root)
    rng = random.Random(seed)
    tmp = Path(root).parent / f"src-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    ready.set()
    while True:
        ids = rng.choice(KILL_DOCS)
        if store.match(FP, ids) is not None and rng.random() < 0.5:
            store.remove((FP, kvfast.document_key(ids)))
        elif rng.random() < 0.5:
            put_fake(store, ids, head_dim=KILL_HEAD_DIM)
        else:
            src = kvfast.save_kv(tmp / "doc.kvf", *fake_kv(ids, head_dim=KILL_HEAD_DIM), ids, fingerprint=FP)
            store.put(src)


def test_a_publisher_killed_at_any_point_never_leaves_a_bad_entry(tmp_path):
    root = tmp_path / "root"
    ctx = forkserver()
    rng = random.Random(1)
    trials = [(None, rng.uniform(0.0, 0.25)) for _ in range(24)] + [(fp, 5.0) for fp in FAILPOINTS for _ in range(2)]
    cache = new_cache(1024, head_dim=KILL_HEAD_DIM)
    checked = set()
    for i, (failpoint, delay) in enumerate(trials):
        ready = ctx.Event()
        p = ctx.Process(target=_publisher, args=(str(root), i, failpoint, ready))
        p.start()
        assert ready.wait(60)
        p.join(delay)
        if p.is_alive():
            p.kill()
        p.join()
        assert p.exitcode == -signal.SIGKILL
        store = kvfast.Store(root)  # a consumer that starts now sees only whole, correct entries
        for entry in store.list():
            st = entry.path.stat()
            identity = (entry.key, st.st_ino, st.st_mtime_ns, st.st_size)
            if identity not in checked:  # an unchanged file was checked after an earlier trial
                assert entry_is_sound(entry), f"trial {i} ({failpoint}): bad entry {entry.path}"
                checked.add(identity)
        for entry in store.list()[:2]:
            ids = KILL_DOCS[[kvfast.document_key(d) for d in KILL_DOCS].index(entry.key.document)]
            seq, n = store.attach(FP, ids, cache, min_rest=0)
            assert n == len(ids) and holds(cache, seq, ids)
            cache.free(seq)
        store.close()
    report = kvfast.Store(root).gc(verify=True)
    print(f"\n{len(trials)} publishers killed; gc afterwards: {report}")
    assert report["corrupt"] == 0
    assert not any((root / ".tmp").iterdir())
    for folder in [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]:
        kvfs = {p.stem for p in folder.glob("*.kvf")}
        assert kvfs == {p.stem for p in folder.glob("*.json")}  # no orphan, no sidecar without its file


# -- many processes at once -----------------------------------------------------------------------------
POOL_BASES = [random_ids(160, seed=90 + i) for i in range(3)]
POOL = [base[:cut] + random_ids(40 + 16 * j, seed=95 + 7 * i + j) for i, base in enumerate(POOL_BASES)
        for j, cut in enumerate((160, 96, 50))]  # overlapping documents: three branches per base


def _worker(root: str, seed: int, ops: int, start, out) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = kvfast.Store(root)
    cache = new_cache(512)
    start.wait(60)  # all eight begin together
    counts = {"put": 0, "put_file": 0, "attach": 0, "reused": 0, "match": 0, "remove": 0}
    errors = []
    src = Path(root).parent / f"w{seed}.kvf"
    for _ in range(ops):
        ids = rng.choice(POOL)
        r = rng.random()
        try:
            if r < 0.2:
                put_fake(store, ids)
                counts["put"] += 1
            elif r < 0.35:
                store.put(kvfast.save_kv(src, *fake_kv(ids), ids, fingerprint=FP, chunk_tokens=48))
                counts["put_file"] += 1
            elif r < 0.85:
                prompt = ids[: rng.randint(1, len(ids))] + random_ids(rng.randint(1, 20), seed=rng.randint(0, 99))
                seq, n = store.attach(FP, prompt, cache)
                if seq.num_tokens != n or not holds(cache, seq, prompt):
                    errors.append(f"attach of {len(prompt)} tokens: {n} reused, bytes differ")
                cache.free(seq)
                counts["attach"] += 1
                counts["reused"] += n
            elif r < 0.9:
                m = store.match(FP, ids + [1])
                if m is not None and m.num_tokens % BLOCK and m.num_tokens != m.entry.num_tokens:
                    errors.append(f"match of {m.num_tokens} tokens is neither block-aligned nor a whole document")
                counts["match"] += 1
            else:
                store.remove((FP, kvfast.document_key(ids)))
                counts["remove"] += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            errors.append(f"{type(exc).__name__}: {exc}")
    out.put((seed, counts, errors, store.stats().corrupt))


def test_eight_processes_publish_and_attach_concurrently(tmp_path):
    root = tmp_path / "root"
    ctx = forkserver()
    out, start, ops = ctx.Queue(), ctx.Barrier(8), 60
    procs = [ctx.Process(target=_worker, args=(str(root), seed, ops, start, out)) for seed in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    totals = {k: sum(r[1][k] for r in results) for k in results[0][1]}
    print(f"\n8 processes, {8 * ops} operations: {totals}")
    assert [e for r in results for e in r[2]] == []
    assert sum(r[3] for r in results) == 0  # no process ever met a corrupt entry
    assert totals["attach"] > 150 and totals["put"] + totals["put_file"] > 50 and totals["reused"] > 0
    store = kvfast.Store(root)
    assert all(entry_is_sound(e) for e in store.list())
    report = store.gc(verify=True)
    assert [report[k] for k in ("temp_files", "orphans", "corrupt", "evicted")] == [0, 0, 0, 0]


# -- command line ---------------------------------------------------------------------------------------
def test_cli_store_put_ls_rm_stats_gc(tmp_path, capsys):
    ids_a, ids_b = random_ids(100, seed=110), random_ids(50, seed=111)
    a = kvfast.save_kv(tmp_path / "a.kvf", *fake_kv(ids_a), ids_a, fingerprint=FP)
    b = kvfast.save_kv(tmp_path / "b.kvf", *fake_kv(ids_b), ids_b, fingerprint=FP)
    root = tmp_path / "root"
    proc = subprocess.run([sys.executable, "-m", "kvfast.cli", "store", "put", str(root), str(a), str(b), str(a)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    key_a = kvfast.document_key(ids_a)
    assert lines[0].startswith(f"stored {key_a}") and lines[2].startswith(f"already stored {key_a}")

    assert cli_main(["store", "ls", str(root)]) == 0
    out = capsys.readouterr().out
    assert key_a[:16] in out and "2 entries" in out
    assert cli_main(["store", "rm", str(root), key_a[:8]]) == 0
    assert cli_main(["store", "rm", str(root), "ffff0000"]) == 2
    assert "matches 0 entries" in capsys.readouterr().err
    assert cli_main(["store", "stats", str(root), "--json"]) == 0
    assert '"entries": 1' in capsys.readouterr().out
    assert cli_main(["store", "gc", str(root), "--disk-bytes", "1K", "--json"]) == 0
    assert '"evicted": 1' in capsys.readouterr().out
    assert kvfast.Store(root).list() == []
