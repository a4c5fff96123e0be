"""Store(root, origin=...): publish on one node, find and attach on another, one fetch per node, atomic creates."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kvfast
from kvfast.origin import Origin
from tests.origin.helpers import FP, assert_loaded, cache_for, config, document, local_kvf_files, node

REPO = Path(__file__).resolve().parents[2]


def objects(s3, who, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` in ``who``'s bucket: name -> size (the tests' own view, through boto3)."""
    out = {}
    for page in s3.client(who).get_paginator("list_objects_v2").paginate(Bucket=who.bucket, Prefix=prefix + "/"):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def test_publish_on_one_node_attach_on_another(s3, prefix, tmp_path):
    keys, values, ids = document(700)
    a = node(tmp_path, "a", s3, s3.a, prefix)
    entry = a.put((keys, values), token_ids=ids, fingerprint=FP)
    stored = objects(s3, s3.a, prefix)
    assert sorted(Path(k).suffix for k in stored) == [".json", ".kvf"]
    assert stored[next(k for k in stored if k.endswith(".kvf"))] == entry.file_bytes

    b = node(tmp_path, "b", s3, s3.a, prefix)
    prompt = ids + [1, 2, 3]
    m = b.match(FP, prompt)
    assert m is not None and m.num_tokens == 700 and m.entry.key == entry.key
    assert local_kvf_files(b) == []  # match read the index, never the document
    cache = cache_for()
    seq, n = b.attach(FP, prompt, cache)
    assert n == 700 and b.stats().hits["origin"] == 1
    assert_loaded(cache, seq, keys, values, n)
    assert len(local_kvf_files(b)) == 1  # read through into B's disk tier

    b.close()  # a second request on B: served locally, not from the origin
    seq2, n2 = b.attach(FP, prompt, cache)
    stats = b.stats()
    assert n2 == 700 and stats.hits["origin"] == 1 and stats.hits["disk"] == 1
    assert_loaded(cache, seq2, keys, values, n2)


def test_match_finds_the_longest_prefix_at_the_origin(s3, prefix, tmp_path):
    a = node(tmp_path, "a", s3, s3.a, prefix)
    keys, values, ids = document(700)
    # two documents sharing a prefix: 320 tokens (whole blocks) and 500 (a partial last block)
    a.put(([k[:320] for k in keys], [v[:320] for v in values]), token_ids=ids[:320], fingerprint=FP)
    a.put(([k[:500] for k in keys], [v[:500] for v in values]), token_ids=ids[:500], fingerprint=FP)
    b = node(tmp_path, "b", s3, s3.a, prefix)
    assert b.match(FP, ids[:600]).num_tokens == 500  # the longer document, whole (its partial block too)
    assert b.match(FP, ids[:450]).num_tokens == 448  # block-aligned inside it
    assert b.match(FP, ids[:320] + [7] * 40).num_tokens == 320  # the shorter one, whole
    assert b.match(FP, [5] * 100) is None
    assert b.match("sha256:" + "fe" * 32, ids) is None  # another model's namespace


def test_a_match_at_the_origin_is_read_there_without_a_fetch(s3, prefix, tmp_path):
    """What an engine's scheduler does before it plans: check the match's header, which is still at the origin."""
    keys, values, ids = document(300, seed=5)
    node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    b = node(tmp_path, "b", s3, s3.a, prefix)
    m = b.match(FP, ids + [9])
    assert m is not None and not m.entry.path.exists()
    remote = b.reader(m.entry)
    assert remote.token_ids.tolist() == ids and remote.manifest.num_layers == len(keys)
    remote.close()
    assert local_kvf_files(b) == []  # nothing fetched: the load does that
    cache = cache_for()
    seq, n = b.attach(FP, ids + [9], cache)
    assert n == 300 and len(local_kvf_files(b)) == 1
    assert str(b.reader(m.entry).path) == str(b.get(m.entry.key).path)  # now the local file, kept open
    assert_loaded(cache, seq, keys, values, n)


def test_store_load_into_fetches_once(s3, prefix, tmp_path):
    keys, values, ids = document(400)
    entry = node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    b = node(tmp_path, "b", s3, s3.a, prefix, ram_bytes=0)
    cache = cache_for()
    blocks = np.arange(30, 30 + 25)
    b.load_into(entry.key, cache.pages, blocks, ids)
    b.load_into(entry.key, cache.pages, blocks, ids[:100])
    assert b.stats().hits == {"device": 0, "ram": 0, "disk": 1, "origin": 1}
    k, v = cache.pages.gather(2, blocks, 400)
    assert torch.equal(k.view(torch.int16), keys[2].view(torch.int16))
    assert torch.equal(v.view(torch.int16), values[2].view(torch.int16))


def test_single_flight_across_threads(s3, prefix, tmp_path):
    keys, values, ids = document(500, seed=3)
    node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    stores = [node(tmp_path, "b", s3, s3.a, prefix) for _ in range(4)]  # four Store objects, one root
    caches = [cache_for() for _ in stores]
    results = [None] * len(stores)
    barrier = threading.Barrier(len(stores))

    def attach(i):
        barrier.wait()
        results[i] = stores[i].attach(FP, ids + [1], caches[i])

    threads = [threading.Thread(target=attach, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r[1] == 500 for r in results)
    assert sum(s.stats().hits["origin"] for s in stores) == 1  # one fetch; the others read it locally
    for cache, (seq, n) in zip(caches, results):
        assert_loaded(cache, seq, keys, values, n)


_ATTACH_PROCESS = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.origin.helpers import FP, cache_for, document, node
from tests.seaweed import S3Server, Tenant
from pathlib import Path
s3 = S3Server({endpoint!r}, None, Tenant(*{a!r}), None)
_, _, ids = document(500, seed=4)
store = node(Path({tmp!r}), "b", s3, s3.a, {prefix!r})
print("ready", flush=True)
sys.stdin.readline()
seq, n = store.attach(FP, ids + [1], cache_for())
print(json.dumps({{"n": n, "hits": store.stats().hits}}), flush=True)
"""


def test_single_flight_across_processes(s3, prefix, tmp_path):
    keys, values, ids = document(500, seed=4)
    node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    code = _ATTACH_PROCESS.format(repo=str(REPO), endpoint=s3.endpoint, a=(s3.a.key, s3.a.secret, s3.a.bucket),
                                  tmp=str(tmp_path), prefix=prefix)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:  # released together
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [o["n"] for o in outs] == [500] * 3
    assert sum(o["hits"]["origin"] for o in outs) == 1 and sum(o["hits"]["disk"] for o in outs) == 2


def test_two_publishers_racing_leave_one_object(s3, prefix, tmp_path):
    keys, values, ids = document(600, seed=5)
    stores = [node(tmp_path, name, s3, s3.a, prefix) for name in ("p1", "p2", "p3")]
    barrier = threading.Barrier(len(stores))
    entries, errors = [], []

    def put(store):
        barrier.wait()
        try:
            entries.append(store.put((keys, values), token_ids=ids, fingerprint=FP))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [], [str(e) for e in errors]
    assert len({e.key for e in entries}) == 1  # every publisher succeeded
    stored = objects(s3, s3.a, prefix)
    assert len(stored) == 2 and {Path(k).suffix for k in stored} == {".kvf", ".json"}


def test_conditional_create_never_overwrites(s3, prefix):
    origin = Origin(f"s3://{s3.a.bucket}/{prefix}", config(s3, s3.a))
    assert origin.put_if_absent("x.bin", b"first")
    assert not origin.put_if_absent("x.bin", b"second")
    assert origin.get("x.bin") == b"first"


def test_put_pushes_an_entry_stored_before_the_origin(s3, prefix, tmp_path):
    keys, values, ids = document(300, seed=6)
    local = kvfast.Store(tmp_path / "a")
    entry = local.put((keys, values), token_ids=ids, fingerprint=FP)
    assert objects(s3, s3.a, prefix) == {}
    a = node(tmp_path, "a", s3, s3.a, prefix)
    assert a.push(entry.key) is True and a.push(entry.key) is False
    assert len(objects(s3, s3.a, prefix)) == 2


@pytest.mark.parametrize("bad", ["missing", "kvf"])
def test_store_without_origin_refuses_origin_calls(tmp_path, bad):
    store = kvfast.Store(tmp_path / "s")
    with pytest.raises(ValueError, match="no origin"):
        store.grant((FP, "0" * 64)) if bad == "missing" else store.push((FP, "0" * 64))
