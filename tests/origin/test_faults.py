"""Faults at the origin: unreachable, killed mid-load, corrupted, a publisher killed mid-upload, an object that
disagrees with its index entry. Each ends in a specific error, no hang, and nothing in a local tier."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import kvfast
from kvfast.loader import stream
from kvfast.loader.stream import RemoteReader
from kvfast.origin import OriginConfig
from tests import seaweed
from tests.origin.helpers import FP, GatedSource, assert_loaded, cache_for, document, local_kvf_files, node
from tests.origin.test_store_origin import REPO, objects

UNREACHABLE_LIMIT_S = 30  # what "a bounded timeout" means here: kvfast's connect timeout and retries, with room


def no_temp_files(store: kvfast.Store) -> bool:
    return not any((store.root / ".tmp").iterdir())


def test_unreachable_origin_is_an_origin_error_within_a_bounded_time(tmp_path):
    port = seaweed.free_ports(1)[0]  # nothing listens there
    store = kvfast.Store(tmp_path / "s", origin="s3://kvfast-nowhere/p",
                         origin_config=OriginConfig(endpoint=f"http://127.0.0.1:{port}", access_key_id="k",
                                                    secret_access_key="s"))
    _, _, ids = document(100)
    started = time.monotonic()
    with pytest.raises(kvfast.OriginError, match="s3://kvfast-nowhere/p"):
        store.attach(FP, ids, cache_for())
    assert time.monotonic() - started < UNREACHABLE_LIMIT_S


def test_flipped_byte_at_the_origin_is_a_checksum_error_and_never_cached(s3, prefix, tmp_path):
    keys, values, ids = document(500, seed=11)
    entry = node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    key = next(k for k in objects(s3, s3.a, prefix) if k.endswith(".kvf"))
    good = entry.path.read_bytes()
    with kvfast.open(entry.path) as r:
        victim = r.chunks[-1]
    bad = bytearray(good)
    bad[victim.offset + 3] ^= 0x01
    admin = s3.client(s3.a)
    admin.put_object(Bucket=s3.a.bucket, Key=key, Body=bytes(bad))

    b = node(tmp_path, "b", s3, s3.a, prefix)
    cache = cache_for()
    free = cache.num_free_blocks
    with pytest.raises(kvfast.ChecksumError, match=f"chunk {victim.index}"):
        b.attach(FP, ids + [1], cache)
    assert local_kvf_files(b) == [] and no_temp_files(b) and cache.num_free_blocks == free

    admin.put_object(Bucket=s3.a.bucket, Key=key, Body=good)  # repaired: the next attach asks the origin again
    seq, n = b.attach(FP, ids + [1], cache)
    assert n == 500 and b.stats().hits["origin"] == 1
    assert_loaded(cache, seq, keys, values, n)


@pytest.mark.parametrize("change", ["other document", "appended bytes"])
def test_object_that_disagrees_with_its_index_entry_is_refused(s3, prefix, tmp_path, change):
    keys, values, ids = document(500, seed=12)
    entry = node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    key = next(k for k in objects(s3, s3.a, prefix) if k.endswith(".kvf"))
    if change == "other document":  # a valid .kvf of the same size and model, other tokens
        k2, v2, ids2 = document(500, seed=13)
        other = tmp_path / "other.kvf"
        kvfast.save_kv(other, k2, v2, ids2, fingerprint=FP)
        body = other.read_bytes()
        assert len(body) == entry.file_bytes
    else:
        body = entry.path.read_bytes() + b"\0" * 4096
    s3.client(s3.a).put_object(Bucket=s3.a.bucket, Key=key, Body=body)
    b = node(tmp_path, "b", s3, s3.a, prefix)
    with pytest.raises(kvfast.OriginError, match="disagrees with its index entry"):
        b.attach(FP, ids + [1], cache_for())
    assert local_kvf_files(b) == [] and no_temp_files(b)


@pytest.fixture
def private_s3():
    """A server of this test's own, to kill."""
    server = seaweed.start_server()
    yield server
    server.stop()


def test_server_killed_mid_load(private_s3, tmp_path, monkeypatch):
    s3 = private_s3
    monkeypatch.setattr(stream, "PIECE_BYTES", 64 << 10)
    keys, values, ids = document(700, seed=14)
    prefix = s3.new_prefix()
    entry = node(tmp_path, "a", s3, s3.a, prefix).put((keys, values), token_ids=ids, fingerprint=FP)
    b = node(tmp_path, "b", s3, s3.a, prefix)
    gates = []
    real_source = b.origin.origin.source

    def gated_source(name):  # the network between B and the origin, held after the first piece
        g = GatedSource(real_source(name), open_until=64 << 10)
        gates.append(g)
        return g

    monkeypatch.setattr(b.origin.origin, "source", gated_source)
    cache = cache_for()
    free = cache.num_free_blocks
    errors: list[BaseException] = []

    def attach():
        try:
            b.attach(FP, ids + [1], cache)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    t = threading.Thread(target=attach)
    t.start()
    # the direct streaming load, held the same way
    reader = RemoteReader(gated_source(b.origin.names(entry.key)[0]))
    handle = kvfast.load_async(reader, cache, fingerprint=FP, threads=2)
    deadline = time.monotonic() + 60
    while not (len(gates) == 2 and all(g.requested > g.open_until for g in gates)):
        assert time.monotonic() < deadline, "the loads never got past their first piece"
        time.sleep(0.05)
    s3.stop()  # the origin dies in the middle of both loads
    for g in gates:
        g.gate.set()
    t.join(UNREACHABLE_LIMIT_S)
    assert not t.is_alive(), "attach hung after the origin died"
    assert len(errors) == 1 and isinstance(errors[0], kvfast.OriginError), errors
    with pytest.raises(kvfast.OriginError):
        handle.wait(timeout=UNREACHABLE_LIMIT_S)
    reader.close()
    assert cache.num_free_blocks == free  # every block given back
    assert local_kvf_files(b) == [] and no_temp_files(b)  # nothing in a local tier


_PUBLISHER = """
import sys
sys.path.insert(0, {repo!r})
import kvfast
from kvfast.origin import OriginConfig
store = kvfast.Store({root!r}, origin={url!r}, origin_config=OriginConfig({endpoint!r}, "us-east-1", {key!r},
                     {secret!r}))
print("start", flush=True)
store.put({kvf!r})
print("done", flush=True)
"""


@pytest.mark.slow
def test_publisher_killed_mid_upload_leaves_nothing_visible(s3, prefix, tmp_path):
    keys, values, ids = document(3000, seed=15, layers=8)  # ~6 MB: the upload takes a while
    kvf = tmp_path / "doc.kvf"
    kvfast.save_kv(kvf, keys, values, ids, fingerprint=FP)
    size = kvf.stat().st_size
    rng = random.Random(0)
    trials, outcomes = 20, []
    for batch in range(0, trials, 5):  # five publishers at a time, each on its own prefix
        procs = []
        for i in range(batch, batch + 5):
            code = _PUBLISHER.format(repo=str(REPO), root=str(tmp_path / f"p{i}"),
                                     url=f"s3://{s3.a.bucket}/{prefix}/{i}", endpoint=s3.endpoint, key=s3.a.key, secret=s3.a.secret, kvf=str(kvf))
            procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout.readline().strip() == "start"
        for p in procs:
            time.sleep(rng.uniform(0.0, 0.15))
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait(30)
            outcomes.append(p.stdout.read().strip())
    for i in range(trials):
        stored = objects(s3, s3.a, f"{prefix}/{i}")
        kvfs = {k: v for k, v in stored.items() if k.endswith(".kvf")}
        index = [k for k in stored if k.endswith(".json")]
        assert all(v == size for v in kvfs.values()), f"trial {i}: a partial object is visible: {kvfs}"
        assert len(index) <= len(kvfs), f"trial {i}: an index entry without its document"
        if index:  # committed before the kill: it loads on another node
            b = node(tmp_path, f"b{i}", s3, s3.a, f"{prefix}/{i}")
            assert b.attach(FP, ids + [1], cache_for(layers=8, blocks=400))[1] == 3000
    assert outcomes.count("done") < trials  # the kills did land mid-publish
