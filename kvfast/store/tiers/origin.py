"""The origin tier, below disk: an S3-compatible object store shared by every node (kvfast.origin.Origin).

    s3://bucket/prefix/<namespace>/<fp>/<document_key>.kvf    the document, byte for byte the local .kvf
    s3://bucket/prefix/<namespace>/<fp>/<document_key>.json   its index entry (the local sidecar's bytes): created
                                                              after the .kvf, so it COMMITS the document; no index
                                                              entry, no document (an upload cut short is invisible)

``<namespace>`` is ``shared`` or the tenant's id (Store(tenant=...)); ``<fp>`` the fingerprint's folder name as on
disk. Both objects are created with ``If-None-Match: *`` in one PUT each: two publishers racing leave one object,
and both succeed. ``match`` reads the index entries of one model (a LIST, then a GET of each entry not seen yet:
they are immutable) and never a document. A miss on the local tiers fetches the document into the disk tier
(read-through) by ranged GETs, every chunk checked before it is written (kvfast.loader.stream.fetch_to_file).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from kvfast.origin import Origin
from kvfast.store.entry import KEY_RE, StoreEntry, StoreKey, fp_dirname
from kvfast.store.index import DirIndex, DiskIndex

LIST_EVERY_S = 1.0  # how often match re-lists one model's index entries (others publish meanwhile)


class OriginTier:
    """One namespace of an origin: upload, index, and the names of a store's entries there.

    Args:
        origin: the bucket and prefix.
        namespace: ``"shared"`` or the tenant's id.
        local: the disk tier's index: it parses index entries exactly as it parses local sidecars, with paths
            where a fetched document lands.
    """

    name = "origin"

    def __init__(self, origin: Origin, namespace: str, local: DiskIndex):
        self.origin, self.namespace, self.local = origin, namespace, local
        self._dirs: dict[str, DirIndex] = {}
        self._listed: dict[str, float] = {}  # fp folder -> monotonic time of its last LIST
        self._raw: dict[str, bytes] = {}  # document key -> its index entry's bytes

    def __repr__(self) -> str:
        return f"OriginTier({self.origin.url!r}, namespace={self.namespace!r})"

    # -- names ------------------------------------------------------------------------------------------------
    def folder(self, fp: str) -> str:
        return f"{self.namespace}/{fp_dirname(fp)}"

    def names(self, key: StoreKey) -> tuple[str, str]:
        """The document's object name and its index entry's (relative to the origin's prefix)."""
        base = f"{self.folder(key.fingerprint)}/{key.document}"
        return f"{base}.kvf", f"{base}.json"

    def url(self, key: StoreKey) -> str:
        return self.origin.url_of(self.names(key)[0])

    # -- the tier ---------------------------------------------------------------------------------------------
    def holds(self, key: StoreKey) -> bool:
        return key.document in self.of(key.fingerprint).entries

    def forget(self, key: StoreKey) -> None:
        """Drop the entry from this node's view (the next LIST brings it back if it is still there)."""
        idx = self._dirs.get(fp_dirname(key.fingerprint))
        if idx is not None:
            self.local._unindex(idx, key.document)
        self._listed.pop(fp_dirname(key.fingerprint), None)

    def used(self) -> int:
        return sum(e.file_bytes for idx in self._dirs.values() for e in idx.entries.values())

    # -- index ------------------------------------------------------------------------------------------------
    def of(self, fp: str, *, fresh: bool = False) -> DirIndex:
        """The origin's entries of one model, re-listed when the last LIST is older than ``LIST_EVERY_S``.

        Raises:
            OriginError: the origin is unreachable or refuses the LIST.
        """
        dirname = fp_dirname(fp)
        idx = self._dirs.setdefault(dirname, DirIndex())
        if not fresh and time.monotonic() - self._listed.get(dirname, -LIST_EVERY_S) < LIST_EVERY_S:
            return idx
        listed = {}
        for name, _ in self.origin.list(f"{self.namespace}/{dirname}"):
            stem, _, ext = name.rpartition("/")[2].rpartition(".")
            if ext == "json" and KEY_RE.fullmatch(stem):
                listed[stem] = name
        for doc in set(idx.entries) - set(listed):
            self.local._unindex(idx, doc)  # removed at the origin
        for doc in set(listed) - set(idx.entries) - set(idx.sidecars):
            raw = self.origin.get(listed[doc])
            if raw is None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported below with the origin's URL, not a local path
                entry = self.local.read_sidecar(self.local.folder(fp), doc, raw)
            if entry is None:
                idx.sidecars[doc] = (0, 0, 0)  # objects are immutable: an invalid one is reported once
                warnings.warn(f"kvfast store: {self.origin.url_of(listed[doc])}: index entry is invalid; skipped",
                              RuntimeWarning, stacklevel=3)
                continue
            self._raw[doc] = raw
            self.local._index_entry(idx, entry)
        self._listed[dirname] = time.monotonic()
        return idx

    def entries(self, fingerprint: str | None = None) -> list[StoreEntry]:
        """Every entry at the origin in this namespace (of one model when ``fingerprint`` is given)."""
        if fingerprint is not None:
            return list(self.of(fingerprint, fresh=True).entries.values())
        out = []
        fps = {name.split("/")[1] for name, _ in self.origin.list(self.namespace) if name.count("/") >= 2}
        for dirname in sorted(fps):
            for name, _ in self.origin.list(f"{self.namespace}/{dirname}"):
                stem, _, ext = name.rpartition("/")[2].rpartition(".")
                if ext == "json" and KEY_RE.fullmatch(stem):
                    raw = self.origin.get(name)
                    entry = raw and self.local.read_sidecar(self.local.data / dirname, stem, raw)
                    if entry:
                        out.append(entry)
        return out

    def signature(self, key: StoreKey) -> dict | None:
        """The publisher's signature sidecar recorded in the document's index entry (what it claims; a store with
        ``trusted_keys`` verifies it against the fetched bytes), or None."""
        raw = self._raw.get(key.document)
        side = json.loads(raw).get("signature") if raw else None
        return None if not isinstance(side, dict) else {k: v for k, v in side.items() if k != "verified"}

    # -- publish ----------------------------------------------------------------------------------------------
    def publish(self, key: StoreKey, kvf: Path, sidecar: bytes) -> bool:
        """Upload a committed local entry: the document, then its index entry (the commit), each created only if
        absent. Returns whether this call created the index entry (False: it was there, or another publisher's
        document of another size holds the name, whose own index entry will describe it)."""
        doc_name, index_name = self.names(key)
        size = kvf.stat().st_size
        if not self.origin.put_if_absent(doc_name, kvf) and self.origin.size(doc_name) != size:
            return False  # the same document in another encoding won the race
        created = self.origin.put_if_absent(index_name, sidecar)
        self._listed.pop(fp_dirname(key.fingerprint), None)
        return created
