"""Tenant isolation in the store: a tenant's salt namespaces its keys, listings, stats and evictions.

The paired conformance test runs each tenant in its own process against one root: the same salt hits, another
salt misses, and listings and stats show only the tenant's own entries.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import kvfast

FP = "sha256:" + "ab" * 32
LAYERS, HEADS, DIM, TOKENS = 2, 2, 8, 48
SALT_A, SALT_B = b"A" * 16 + b"tenant-a-secret", b"B" * 16 + b"tenant-b-secret"

# One tenant's process: runs a list of actions against the store and prints one JSON result per action.
TENANT_PROCESS = textwrap.dedent('''
    import json, sys, torch, kvfast
    root, salt, actions = sys.argv[1], bytes.fromhex(sys.argv[2]) if sys.argv[2] else None, json.loads(sys.argv[3])
    FP, LAYERS, HEADS, DIM, TOKENS = "sha256:" + "ab" * 32, 2, 2, 8, 48
    def doc(seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 1000, (TOKENS,), generator=g).tolist()
        kv = [[torch.randn(TOKENS, HEADS, DIM, generator=g) for _ in range(LAYERS)] for _ in range(2)]
        return ids, kv
    store = kvfast.Store(root, tenant=salt)
    cache = kvfast.PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=32, block_size=16,
                                dtype=torch.float32)
    out = []
    for action, seed in actions:
        if action == "put":
            ids, (k, v) = doc(seed)
            out.append(store.put((k, v), token_ids=ids, fingerprint=FP).key.document)
        elif action == "attach":
            seq, n = store.attach(FP, doc(seed)[0] + [1], cache)
            cache.free(seq)
            out.append(n)
        elif action == "match":
            out.append(store.match(FP, doc(seed)[0]) is not None)
        elif action == "list":
            out.append(sorted(e.key.document for e in store.list()))
        elif action == "stats":
            s = store.stats()
            out.append([s.entries, s.loads_served, s.misses])
    print(json.dumps({"tenant_id": store.tenant_id, "results": out}))
''')


def run_tenant(root, salt: bytes | None, actions: list) -> dict:
    proc = subprocess.run([sys.executable, "-c", TENANT_PROCESS, str(root), salt.hex() if salt else "",
                           json.dumps(actions)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_paired_conformance_across_processes(tmp_path):
    root = tmp_path / "store"
    a1 = run_tenant(root, SALT_A, [["put", 0], ["put", 1], ["attach", 0], ["list", 0]])
    doc0, doc1 = a1["results"][0], a1["results"][1]
    assert a1["results"][2] == TOKENS and a1["results"][3] == sorted([doc0, doc1])

    b = run_tenant(root, SALT_B, [["attach", 0], ["match", 0], ["match", 1], ["list", 0], ["stats", 0],
                                  ["put", 0], ["put", 2], ["list", 0]])
    attach0, match0, match1, listed, stats, b_doc0, b_doc2, listed_after = b["results"]
    assert attach0 == 0 and not match0 and not match1  # another salt misses the very same document
    assert listed == [] and stats == [0, 0, 1]  # and sees none of A's entries
    assert b_doc0 != doc0  # the same document has another key in B's namespace: no cross-tenant dedup
    assert listed_after == sorted([b_doc0, b_doc2])

    a2 = run_tenant(root, SALT_A, [["attach", 0], ["attach", 1], ["attach", 2], ["list", 0], ["stats", 0]])
    assert a2["results"][:3] == [TOKENS, TOKENS, 0]  # same salt hits, in a new process; B's document misses
    assert a2["results"][3] == sorted([doc0, doc1]) and a2["results"][4] == [2, 2, 1]
    assert a2["tenant_id"] == a1["tenant_id"] != b["tenant_id"]

    shared = run_tenant(root, None, [["attach", 0], ["list", 0]])
    assert shared["results"] == [0, []]  # the unsalted namespace sees no tenant's entries

    ledger = kvfast.Ledger(root / ".tenants" / a1["tenant_id"]).verify()  # each tenant's own chain
    assert ledger.ok and set(ledger.totals) == {a1["tenant_id"]}
    assert ledger.totals[a1["tenant_id"]]["loads"] == 3
    assert kvfast.Ledger(root).verify().records == 0  # the shared namespace served nothing


def kv(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (TOKENS,), generator=g).tolist()
    return ids, [[torch.randn(TOKENS, HEADS, DIM, generator=g) for _ in range(LAYERS)] for _ in range(2)]


def test_salt_must_be_a_server_side_secret(tmp_path):
    for bad in (b"short", "a-tenant-name" * 4, 12345):
        with pytest.raises(ValueError, match="secret salt"):
            kvfast.Store(tmp_path, tenant=bad)


def test_salt_is_mixed_into_document_keys_and_block_hashes(tmp_path):
    ids, (k, v) = kv(0)
    plain, a, b = (kvfast.Store(tmp_path, tenant=t) for t in (None, SALT_A, SALT_B))
    keys = {s.put((k, v), token_ids=ids, fingerprint=FP).key.document for s in (plain, a, b)}
    assert len(keys) == 3 and kvfast.document_key(ids) in keys
    hashes = [set(s.list()[0].block_hashes) for s in (plain, a, b)]
    assert not (hashes[0] & hashes[1]) and not (hashes[1] & hashes[2])
    # A prefix of the document still matches within the tenant (the salted chain stays prefix-closed).
    assert a.match(FP, ids[:32] + [5, 6]).num_tokens == 32


def test_lookups_never_touch_another_tenants_folders(tmp_path):
    ids, (k, v) = kv(0)
    a = kvfast.Store(tmp_path, tenant=SALT_A)
    a.put((k, v), token_ids=ids, fingerprint=FP)
    b = kvfast.Store(tmp_path, tenant=SALT_B)
    assert b.match(FP, ids) is None and b.list() == [] and b.stats().entries == 0
    # B's lookup work is the same whether or not A holds the document: its index holds only B's folders.
    assert all(idx.entries == {} for idx in b.disk.index._dirs.values())
    assert {p.name for p in (tmp_path / ".tenants").iterdir()} == {a.tenant_id, b.tenant_id}
    assert not any(b.disk.data.iterdir())


def test_evictions_only_see_the_tenants_own_entries(tmp_path):
    a_ids, a_kv = kv(0)
    a = kvfast.Store(tmp_path, tenant=SALT_A)
    a_entry = a.put(a_kv, token_ids=a_ids, fingerprint=FP)
    budget = a_entry.file_bytes * 2  # room for two of B's entries
    b = kvfast.Store(tmp_path, tenant=SALT_B, disk_bytes=budget)
    for seed in range(1, 6):
        ids, kvs = kv(seed)
        b.put(kvs, token_ids=ids, fingerprint=FP)
    assert len(b.list()) == 2 and b.stats().evictions["disk"] == 3
    assert a.get(a_entry.key) is not None and a_entry.path.exists()  # B's pressure never evicts A
    assert b.gc()["entries"] == 2 and a.list() == [a_entry]
