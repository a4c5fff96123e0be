"""Read-through from the origin into the disk tier: one fetch per document per node.

    origin entry ──[fetch lock of this root]── local entry now? ── yes: use it
                                                └─ no: ranged GETs ──CRC per chunk──▶ ROOT/.tmp
                                                   ──checks vs the index entry, signature──▶
                                                   commit (tiers/disk.py) as a local entry

The fetch lock is an ``fcntl.flock`` of the root, so a second attach of the same document — another thread, another
Store object, another process on this node — waits for the first and then reads the local copy. Nothing is
committed unless every chunk passed its checksum and the object agrees with its index entry; a failed fetch leaves
no local entry, so the next attach asks the origin again.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvfast.errors import OriginError, SignatureError
from kvfast.format import DTYPE_NAMES, open_kvf
from kvfast.loader.stream import RemoteReader, fetch_to_file
from kvfast.store.entry import StoreEntry
from kvfast.trust.signing import verify_signature

if TYPE_CHECKING:
    from kvfast.store.store import Store


def fetch(store: Store, entry: StoreEntry) -> tuple[StoreEntry, bool]:
    """The local entry of an origin ``entry``, and whether this call fetched it (False: another thread or process
    of this node had, or was doing so while this one waited).

    Raises:
        OriginError: the origin is unreachable or refuses, or the object disagrees with its index entry.
        ChecksumError: a chunk at the origin is corrupted (nothing is written to a local tier).
        SignatureError: the store has ``trusted_keys`` and the document's signature does not verify.
    """
    origin, key = store.origin, entry.key
    with store.disk.flock(f"fetch-{key.document[:2]}"):
        local = store.disk.index.get(key)
        if local is not None and local.path.exists():
            return local, False  # another thread or process fetched it while we waited
        doc_name, _ = origin.names(key)
        tmp = store.disk.tmp_path(".kvf")
        try:
            source = origin.origin.source(doc_name)
            if source.size != entry.file_bytes:  # before a byte of it is parsed
                raise OriginError(f"the object disagrees with its index entry (size {source.size}, the entry says "
                                  f"{entry.file_bytes}); refused: re-publish it", path=source.url)
            with RemoteReader(source) as reader:
                _check_agrees(store, entry, reader)
                fetch_to_file(reader, tmp)
            with open_kvf(tmp) as r:  # the bytes committed, re-validated from the local file
                _check_agrees(store, entry, r)
                provenance, signature = _provenance(store, entry, r)
            return store._commit_local(key, tmp, provenance, signature), True
        finally:
            tmp.unlink(missing_ok=True)


def _check_agrees(store: Store, entry: StoreEntry, reader: Any) -> None:
    """Refuse an object whose size or manifest disagrees with the index entry it was found through."""
    m = reader.manifest
    url = store.origin.url(entry.key)
    size = reader.source.size if isinstance(reader, RemoteReader) else reader.path.stat().st_size
    problems = [what for what, bad in (
        ("size", size != entry.file_bytes),
        ("fingerprint", m.fingerprint != entry.key.fingerprint),
        ("num_tokens", m.num_tokens != entry.num_tokens),
        ("shape", (m.num_layers, m.num_kv_heads, m.head_dim) != (entry.num_layers, entry.num_kv_heads,
                                                                   entry.head_dim)),
        ("dtype", DTYPE_NAMES[m.dtype] != entry.dtype),
        ("kv_bytes", sum(c.raw_length for c in reader.chunks) != entry.kv_bytes),
        ("document_key", store.document_key(reader.token_ids) != entry.key.document),
    ) if bad]
    if problems:
        raise OriginError(f"the object disagrees with its index entry ({', '.join(problems)}); refused: re-publish "
                          "it", path=url)


def _provenance(store: Store, entry: StoreEntry, reader: Any) -> tuple[str, dict[str, Any] | None]:
    """What the local entry records. Another node's claims are never taken on trust: a store with
    ``trusted_keys`` verifies the publisher's signature over the fetched bytes; else the entry is unsigned."""
    if store._trusted is None:
        return "unsigned", None
    raw = store.origin.signature(entry.key)
    if raw is None:
        raise SignatureError("this store only takes signed artifacts and the document at the origin carries no "
                             "signature", path=store.origin.url(entry.key))
    try:
        verified = verify_signature(reader, store._trusted.values(), signature=raw)
    except SignatureError as exc:
        raise SignatureError(f"{exc}; not fetched", path=store.origin.url(entry.key)) from None
    return f"signed:{verified.key_id}", {**raw, "verified": {**verified.to_json(), "time": time.time()}}
