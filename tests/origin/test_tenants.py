"""Tenants at the origin: each in its own bucket with its own keys; a presigned grant is the right to load one
document and nothing else; signatures (trusted_keys) hold for documents fetched from the origin."""
from __future__ import annotations

import secrets
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

import kvfast
from kvfast.origin import Origin
from tests.origin.helpers import FP, assert_loaded, cache_for, config, document, local_kvf_files, node
from tests.origin.test_store_origin import objects

SALT_A = secrets.token_bytes(32)


@pytest.fixture
def tenant_a_doc(s3, prefix, tmp_path):
    """Tenant A's store, with one document published to A's bucket: (store, entry, keys, values, ids)."""
    keys, values, ids = document(400, seed=21)
    a = node(tmp_path, "a", s3, s3.a, prefix, tenant=SALT_A)
    entry = a.put((keys, values), token_ids=ids, fingerprint=FP)
    return a, entry, keys, values, ids


def test_tenant_entries_live_under_the_tenant_id(s3, prefix, tenant_a_doc):
    a, *_ = tenant_a_doc
    assert all(k.startswith(f"{prefix}/{a.tenant_id}/") for k in objects(s3, s3.a, prefix))


@pytest.mark.parametrize("call", ["list", "get", "head", "overwrite"])
def test_tenant_b_keys_cannot_touch_tenant_a_documents(s3, prefix, tenant_a_doc, call):
    a, entry, *_ = tenant_a_doc
    name = a.origin.names(entry.key)[0]
    as_b = Origin(f"s3://{s3.a.bucket}/{prefix}", config(s3, s3.b))  # A's bucket, B's keys
    before = objects(s3, s3.a, prefix)
    with pytest.raises(kvfast.OriginError, match=f"s3://{s3.a.bucket}/{prefix}"):
        {"list": lambda: list(as_b.list(a.tenant_id)), "get": lambda: as_b.get(name),
         "head": lambda: as_b.size(name), "overwrite": lambda: as_b.put_if_absent(name + ".x", b"evil")}[call]()
    assert objects(s3, s3.a, prefix) == before


def test_a_refused_write_is_an_error_whatever_its_key_spells(s3, prefix):
    """The refusal's message holds the object's key: a key whose hex digits spell 412 is not "already exists"
    (a random document key did so in about 1 run in 40)."""
    as_b = Origin(f"s3://{s3.a.bucket}/{prefix}", config(s3, s3.b))
    with pytest.raises(kvfast.OriginError, match="conditional PUT failed"):
        as_b.put_if_absent("a412b/412412.kvf", b"evil")
    assert objects(s3, s3.a, prefix) == {}


def test_tenant_b_store_on_a_bucket_is_refused(s3, prefix, tenant_a_doc, tmp_path):
    _, _, _, _, ids = tenant_a_doc
    b = node(tmp_path, "b", s3, s3.b, prefix)
    b_on_a = kvfast.Store(tmp_path / "b2", origin=f"s3://{s3.a.bucket}/{prefix}", origin_config=config(s3, s3.b))
    assert b.match(FP, ids) is None  # its own bucket holds nothing of A's
    with pytest.raises(kvfast.OriginError):
        b_on_a.attach(FP, ids, cache_for())


def test_grant_is_the_right_to_load_one_document(s3, tenant_a_doc, monkeypatch):
    a, entry, keys, values, ids = tenant_a_doc
    url = a.grant(entry.key, ttl_s=120)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    cache = cache_for()
    seq = kvfast.load(url, cache, fingerprint=FP, token_ids=ids)
    assert_loaded(cache, seq, keys, values, len(ids))

    parts = urlsplit(url)  # the same signature on another object: refused
    other = urlunsplit(parts._replace(path=parts.path.replace(".kvf", ".json")))
    with pytest.raises(kvfast.OriginError, match="403"):
        kvfast.load(other, cache, fingerprint=FP)


def test_altered_presigned_url_is_refused(tenant_a_doc):
    a, entry, *_ = tenant_a_doc
    parts = urlsplit(a.grant(entry.key, ttl_s=120))
    query = dict(parse_qsl(parts.query))
    sig = query["X-Amz-Signature"]
    query["X-Amz-Signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    with pytest.raises(kvfast.OriginError, match="HTTP 403"):
        kvfast.load(urlunsplit(parts._replace(query=urlencode(query))), cache_for(), fingerprint=FP)


def test_expired_presigned_url_is_refused(tenant_a_doc):
    a, entry, *_ = tenant_a_doc
    url = a.grant(entry.key, ttl_s=1)
    time.sleep(2.5)
    with pytest.raises(kvfast.OriginError, match="expired"):
        kvfast.load(url, cache_for(), fingerprint=FP)


def test_grant_of_an_unknown_document_is_a_key_error(tenant_a_doc):
    a, *_ = tenant_a_doc
    with pytest.raises(KeyError):
        a.grant((FP, "0" * 64))


def test_signatures_hold_for_documents_from_the_origin(s3, prefix, tmp_path):
    keys, values, ids = document(300, seed=22)
    signer = tmp_path / "publisher.key"
    kvfast.keygen(signer)
    stranger = tmp_path / "stranger.key"
    kvfast.keygen(stranger)
    kvf = tmp_path / "doc.kvf"
    kvfast.save_kv(kvf, keys, values, ids, fingerprint=FP)
    kvfast.sign(kvf, signer)
    pub = f"{signer}.pub"
    node(tmp_path, "a", s3, s3.a, prefix, trusted_keys=[pub]).put(kvf)

    refusing = node(tmp_path, "b", s3, s3.a, prefix, trusted_keys=[f"{stranger}.pub"])
    with pytest.raises(kvfast.SignatureError):
        refusing.attach(FP, ids + [1], cache_for())
    assert local_kvf_files(refusing) == []

    trusting = node(tmp_path, "c", s3, s3.a, prefix, trusted_keys=[pub])
    cache = cache_for()
    seq, n = trusting.attach(FP, ids + [1], cache)
    assert n == 300 and trusting.list()[0].provenance.startswith("signed:")
    assert_loaded(cache, seq, keys, values, n)
