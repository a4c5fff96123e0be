"""Streaming load from an origin (kvfast/loader/stream.py): s3:// and presigned URLs, bit for bit, layer 0 before the
rest has arrived, memory bounded by the ring, every chunk checked before it reaches a page."""
from __future__ import annotations

import pytest
import torch

import kvfast
from kvfast.loader import stream
from kvfast.loader.stream import RemoteReader, open_remote
from kvfast.origin import Origin
from tests.origin.helpers import FP, GatedSource, assert_loaded, cache_for, config, document

LAYOUTS = ("NHD", "HND")
PREFIXES = (None, 333)  # the whole document, and a prefix that ends inside a chunk and a block


@pytest.fixture
def published(s3, prefix, tmp_path):
    """A document saved with small chunks (many ranged GETs) and uploaded by tenant A: (keys, values, ids, name)."""
    keys, values, ids = document(700)
    path = tmp_path / "doc.kvf"
    kvfast.save_kv(path, keys, values, ids, fingerprint=FP, chunk_tokens=64)
    name = f"{prefix}/doc.kvf"
    s3.client(s3.a).upload_file(str(path), s3.a.bucket, name)
    return keys, values, ids, name


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_tokens", PREFIXES)
def test_load_from_s3_url_is_bit_exact(s3, tenant_a_env, published, layout, num_tokens):
    keys, values, ids, name = published
    cache = cache_for(layout=layout)
    seq = kvfast.load(f"s3://{s3.a.bucket}/{name}", cache, fingerprint=FP, num_tokens=num_tokens)
    n = num_tokens or len(ids)
    assert seq.num_tokens == n
    assert_loaded(cache, seq, keys, values, n)


def test_load_from_presigned_url_needs_no_credentials(s3, published, monkeypatch):
    keys, values, ids, name = published
    url = Origin(f"s3://{s3.a.bucket}", config(s3, s3.a)).presign(name, 60)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    cache = cache_for()
    seq = kvfast.load(url, cache, fingerprint=FP, token_ids=ids)
    assert_loaded(cache, seq, keys, values, len(ids))


def test_load_into_pages_from_origin(s3, tenant_a_env, published):
    keys, _, _, name = published
    cache = cache_for()
    blocks = list(range(100, 100 + 44))[::-1]  # any order the engine likes
    handle = kvfast.load_into(f"s3://{s3.a.bucket}/{name}", cache.pages, blocks, fingerprint=FP)
    assert handle.num_tokens == 700 and handle.method == "stream"
    k, _ = cache.pages.gather(0, blocks, 700)
    assert torch.equal(k.view(torch.int16), keys[0].view(torch.int16))


def test_layer0_is_ready_before_the_rest_arrives_and_memory_is_the_ring(s3, tenant_a_env, published, monkeypatch):
    keys, values, ids, name = published
    monkeypatch.setattr(stream, "PIECE_BYTES", 64 << 10)  # many pieces, so the ring is smaller than the document
    real = open_remote(f"s3://{s3.a.bucket}/{name}")
    last0 = max((c for c in real.chunks if c.layer == 0), key=lambda c: c.offset)
    layer0_end = next(p.stop for p in stream.plan_pieces(real.chunks) if last0 in p.chunks)  # its GET's end
    gated = GatedSource(real.source, open_until=layer0_end)
    real.close()
    reader = RemoteReader(gated)
    cache = cache_for()
    threads = 2
    handle = kvfast.load_async(reader, cache, fingerprint=FP, threads=threads)
    try:
        handle.wait_layer(0, timeout=60)  # returns although later layers are held back at the origin
        assert not handle.done()
        ring = threads * stream.RING_SLOTS_PER_THREAD * stream.PIECE_BYTES
        assert gated.requested <= layer0_end + ring < gated.size  # bounded by the ring, never the file
        k, _ = cache.gather(handle.sequence, 0)
        assert torch.equal(k.view(torch.int16), keys[0].view(torch.int16))
    finally:
        gated.gate.set()
    seq = handle.wait()
    assert_loaded(cache, seq, keys, values, len(ids))
    reader.close()


def test_corrupted_object_never_reaches_a_page(s3, tenant_a_env, published, tmp_path):
    keys, values, ids, name = published
    path = tmp_path / "bad.kvf"
    kvfast.save_kv(path, keys, values, ids, fingerprint=FP, chunk_tokens=64)
    with kvfast.open(path) as r:
        victim = r.chunks[5]
    raw = bytearray(path.read_bytes())
    raw[victim.offset + 10] ^= 0x40
    bad = name.replace("doc.kvf", "bad.kvf")
    s3.client(s3.a).put_object(Bucket=s3.a.bucket, Key=bad, Body=bytes(raw))
    cache = cache_for()
    free = cache.num_free_blocks
    with pytest.raises(kvfast.ChecksumError, match="chunk 5") as info:
        kvfast.load(f"s3://{s3.a.bucket}/{bad}", cache, fingerprint=FP)
    assert info.value.chunk == 5 and str(info.value).startswith(f"s3://{s3.a.bucket}/{bad}")
    assert cache.num_free_blocks == free  # the load's blocks were given back


def test_missing_object_is_an_origin_error(s3, tenant_a_env, prefix):
    url = f"s3://{s3.a.bucket}/{prefix}/absent.kvf"
    with pytest.raises(kvfast.OriginError, match=url):
        kvfast.load(url, cache_for(), fingerprint=FP)


def test_not_a_kvf_object_is_refused(s3, tenant_a_env, prefix):
    s3.client(s3.a).put_object(Bucket=s3.a.bucket, Key=f"{prefix}/x.kvf", Body=b"hello world" * 100)
    with pytest.raises(kvfast.NotKvfError):
        kvfast.load(f"s3://{s3.a.bucket}/{prefix}/x.kvf", cache_for(), fingerprint=FP)
