"""Hostile inputs and hostile neighbours on the store, trust and file-system side (issue 17, points 2, 5, 7, 8,
9, 12): names that try to leave their folder, files that are not files, symbolic links planted in the root, a
torn ledger, one tenant reading another's usage, and a size that went stale behind a long-lived store.

Every test uses real files, real FIFOs and symbolic links, and real stores; each fails on the code before the fix.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.errors import InvalidArgumentError

FP = "sha256:" + "5a" * 32
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
SALT_A, SALT_B = b"A" * 16 + b"tenant-a-secret", b"B" * 16 + b"tenant-b-secret"


def fake_kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(tokens, HEADS, HEAD_DIM, generator=g) for _ in range(LAYERS)],
            [torch.randn(tokens, HEADS, HEAD_DIM, generator=g) for _ in range(LAYERS)])


def doc_ids(tokens: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def put(store: kvfast.Store, seed: int, tokens: int = 40, **options) -> kvfast.StoreEntry:
    return store.put(fake_kv(tokens, seed), token_ids=doc_ids(tokens, seed), fingerprint=FP, **options)


def new_cache() -> kvfast.PagedKVCache:
    return kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=64, block_size=16, dtype=torch.float32)


def attach(store: kvfast.Store, seed: int, tokens: int = 40) -> int:
    cache = new_cache()
    seq, n = store.attach(FP, doc_ids(tokens, seed) + [1], cache)
    cache.free(seq)
    return n


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (symbolic links not followed), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- 2: every name that reaches a path has its exact grammar --------------------------------------------------
def test_remove_cannot_leave_the_entrys_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("data.json", "data.kvf"):
        (outside / name).write_text("precious")
    store = kvfast.Store(tmp_path / "store")
    entry = put(store, 0)
    before = tree(tmp_path)
    for document in ("../../outside/data", str(outside / "data"), entry.key.document.upper(),
                     entry.key.document + "/", entry.key.document[:63], "", None):
        with pytest.raises(InvalidArgumentError, match="document key must be 64 lowercase hex digits"):
            store.remove((FP, document))
    for fingerprint in ("sha256:../../outside", "sha256:" + "5A" * 32, "md5:" + "5a" * 16, FP + "/x"):
        with pytest.raises(InvalidArgumentError, match="model fingerprint must be 'sha256:'"):
            store.remove((fingerprint, entry.key.document))
    assert tree(tmp_path) == before  # nothing deleted, not even a lock file created
    assert store.get(entry.key) == entry


def test_a_tenant_cannot_reach_another_tenants_entry(tmp_path):
    a, b = kvfast.Store(tmp_path, tenant=SALT_A), kvfast.Store(tmp_path, tenant=SALT_B)
    victim = put(b, 0)
    traversal = f"../../{b.tenant_id}/sha256-{'5a' * 32}/{victim.key.document}"
    for call in (lambda: a.remove((FP, traversal)), lambda: a.get((FP, traversal)),
                 lambda: a.load_into((FP, traversal), new_cache().pages, [0, 1, 2], doc_ids(40, 0))):
        with pytest.raises(InvalidArgumentError, match=r"document key .* got '\.\./\.\./"):
            call()
    assert victim.path.exists() and b.get(victim.key) == victim


@pytest.mark.parametrize("call", ["list", "match", "attach", "put"])
def test_every_store_method_checks_the_fingerprint(tmp_path, call):
    store = kvfast.Store(tmp_path / "store")
    bad = "sha256:../../../x"
    with pytest.raises(InvalidArgumentError, match=r"got 'sha256:\.\./\.\./\.\./x'"):
        {"list": lambda: store.list(bad), "match": lambda: store.match(bad, doc_ids(40, 0)),
         "attach": lambda: store.attach(bad, doc_ids(40, 0), new_cache()),
         "put": lambda: store.put(fake_kv(40, 0), token_ids=doc_ids(40, 0), fingerprint=bad)}[call]()
    assert tree(tmp_path / "store") == {".tmp", ".locks", "STORE.json", ".locks/root.lock"}


def test_a_file_whose_fingerprint_is_not_a_fingerprint_is_not_stored(tmp_path):
    path = kvfast.save_kv(tmp_path / "doc.kvf", *fake_kv(40, 0), doc_ids(40, 0), fingerprint="../../../etc")
    store = kvfast.Store(tmp_path / "store")
    with pytest.raises(kvfast.ManifestError, match=r"doc\.kvf: model\.fingerprint: .*'\.\./\.\./\.\./etc'"):
        store.put(path)
    assert store.list() == []


def test_grammar_checks_accept_exactly_their_grammar():
    from kvfast.store.entry import check_document_key, check_fingerprint, check_tenant_id

    assert check_document_key("0f" * 32) == "0f" * 32 and check_fingerprint(FP) == FP
    assert check_tenant_id("ab" * 16) == "ab" * 16
    for bad in ("0f" * 32 + "\n", "0f" * 31 + "0g", b"0f" * 32, 5):
        with pytest.raises(InvalidArgumentError):
            check_document_key(bad)
    for bad in ("../" + "ab" * 15, "AB" * 16, "ab" * 17):
        with pytest.raises(InvalidArgumentError, match="tenant id"):
            check_tenant_id(bad)
