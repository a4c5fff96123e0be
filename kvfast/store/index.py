"""The store's index is its directory: one sidecar per entry (``<fp>/<document_key>.json``), read back into
in-memory maps by block hash, and rescanned whenever a folder's mtime moves (other processes publish and remove)."""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfast._fs import read_small_file
from kvfast.errors import FileAccessError
from kvfast.format import DTYPE_NAMES, DTYPES, KvfReader
from kvfast.store.entry import KEY_RE, StoreEntry, StoreKey, check_document_key, fp_dirname

STORE_VERSION = 1
# Linux stamps files with a coarse clock (a few ms): a directory changed again within the same tick keeps
# its mtime, so a scan is trusted for later calls only once the directory's mtime is this far in the past.
_MTIME_SETTLE_NS = 1_000_000_000
# A sidecar holds 64 hex digits per block of the hash chain: this cap allows 16 M tokens at 16 tokens per block.
MAX_SIDECAR_BYTES = 64 << 20


@dataclass
class DirIndex:
    """What one fingerprint folder holds, rebuilt from the folder whenever its mtime moves."""

    stamp: tuple[int, int] | None = None  # (mtime_ns, inode) at the last trusted scan
    entries: dict[str, StoreEntry] = field(default_factory=dict)
    by_hash: dict[str, set[str]] = field(default_factory=dict)  # block hash -> documents with that prefix
    by_tail: dict[str, set[str]] = field(default_factory=dict)  # last full-block hash ("" if none) -> documents
                                                                # that end in a partial block
    sidecars: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # document -> (inode, mtime_ns,
    # size) of its sidecar when last read, valid or not: a sidecar replaced under the same name (removed and put
    # again by another process, perhaps with another codec and size) is read again; a bad one is reported once


class DiskIndex:
    """The entries under ``data`` (one folder per fingerprint), as their sidecars describe them.

    Args:
        data: the folder holding the fingerprint folders (the root, or a tenant's folder).
        block_tokens: the store's tokens per hash-chain block (sidecars made with another value are invalid).
    """

    def __init__(self, data: Path, block_tokens: int):
        self.data, self.block_tokens = data, block_tokens
        self._dirs: dict[str, DirIndex] = {}
        self.invalid_sidecars = 0  # sidecars found invalid, for StoreStats.corrupt

    def folder(self, fp: str) -> Path:
        return self.data / fp_dirname(fp)

    def paths(self, key: StoreKey) -> tuple[Path, Path]:
        """The entry's .kvf file and its sidecar (both parts of ``key`` checked: no name leaves its folder)."""
        folder, doc = self.folder(key.fingerprint), check_document_key(key.document)
        return folder / f"{doc}.kvf", folder / f"{doc}.json"

    def dirnames(self) -> list[str]:
        """The model folders: real folders only; a symbolic link planted among them is not followed (gc would
        delete the files it points at)."""
        with os.scandir(self.data) as it:
            return [d.name for d in it if d.is_dir(follow_symlinks=False) and not d.name.startswith(".")]

    def of(self, fp: str) -> DirIndex:
        """The index of one model's folder, rescanned first if it changed."""
        return self.scan(fp_dirname(fp))

    def get(self, key: StoreKey) -> StoreEntry | None:
        return self.of(key.fingerprint).entries.get(key.document)

    def entries(self, fingerprint: str | None = None) -> list[StoreEntry]:
        dirs = [fp_dirname(fingerprint)] if fingerprint is not None else self.dirnames()
        return [e for d in dirs for e in self.scan(d).entries.values()]

    def scan(self, dirname: str) -> DirIndex:
        """The folder's entries, rescanned when its mtime moved."""
        idx = self._dirs.setdefault(dirname, DirIndex())
        folder = self.data / dirname
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):  # absent, or a link or file planted there: no entries
            for doc in list(idx.sidecars):
                self._unindex(idx, doc)
            idx.stamp = None
            return idx
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == idx.stamp:
            return idx
        names = {n[:-5] for n in os.listdir(folder) if n.endswith(".json") and KEY_RE.fullmatch(n[:-5])}
        for doc in set(idx.sidecars) - names:
            self._unindex(idx, doc)
        for doc in names:
            try:
                side = os.lstat(folder / f"{doc}.json")
            except FileNotFoundError:
                self._unindex(idx, doc)
                continue
            version = (side.st_ino, side.st_mtime_ns, side.st_size)
            if idx.sidecars.get(doc) == version:
                continue
            self._unindex(idx, doc)
            entry = self.read_sidecar(folder, doc)
            if entry is not None:
                self._index_entry(idx, entry)
            idx.sidecars[doc] = version
        settled = time.time_ns() - st.st_mtime_ns > _MTIME_SETTLE_NS
        idx.stamp = stamp if settled else None
        return idx

    def forget(self, key: StoreKey) -> None:
        self._unindex(self.of(key.fingerprint), key.document)

    def _index_entry(self, idx: DirIndex, entry: StoreEntry) -> None:
        doc = entry.key.document
        idx.entries[doc] = entry
        for h in entry.block_hashes:
            idx.by_hash.setdefault(h, set()).add(doc)
        if entry.num_tokens % self.block_tokens:
            idx.by_tail.setdefault(entry.block_hashes[-1] if entry.block_hashes else "", set()).add(doc)

    def _unindex(self, idx: DirIndex, doc: str) -> None:
        idx.sidecars.pop(doc, None)
        entry = idx.entries.pop(doc, None)
        if entry is None:
            return
        slots = [(idx.by_hash, h) for h in entry.block_hashes]
        if entry.num_tokens % self.block_tokens:
            slots.append((idx.by_tail, entry.block_hashes[-1] if entry.block_hashes else ""))
        for table, h in slots:
            docs = table.get(h)
            if docs is not None:
                docs.discard(doc)
                if not docs:
                    del table[h]

    def read_sidecar(self, folder: Path, doc: str, raw: bytes | None = None) -> StoreEntry | None:
        """The entry a sidecar describes (its bytes ``raw`` when given), or None when absent or invalid."""
        path = folder / f"{doc}.json"
        try:
            body = json.loads(read_small_file(path, MAX_SIDECAR_BYTES, follow_symlinks=False)[0] if raw is None
                              else raw)
            kv = body["kv"]
            entry = StoreEntry(
                key=StoreKey(str(body["fingerprint"]), str(body["document_key"])), path=folder / f"{doc}.kvf",
                num_tokens=int(body["num_tokens"]), num_layers=int(kv["num_layers"]),
                num_kv_heads=int(kv["num_kv_heads"]), head_dim=int(kv["head_dim"]), dtype=str(kv["dtype"]),
                kv_bytes=int(body["kv_bytes"]), file_bytes=int(body["file_bytes"]), created=float(body["created"]),
                block_hashes=tuple(re.findall("." * 64, body["block_hashes"])),
                provenance=str(body.get("provenance", "unsigned")))
            problems = [what for what, bad in (
                ("document_key", entry.key.document != doc),
                ("fingerprint", fp_dirname(entry.key.fingerprint) != folder.name),
                ("block_tokens", body["block_tokens"] != self.block_tokens),
                ("num_tokens", entry.num_tokens < 1),
                ("dtype", entry.dtype not in DTYPES),
                ("block_hashes", len(body["block_hashes"]) != 64 * (entry.num_tokens // self.block_tokens)),
            ) if bad]
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                return None  # removed between the listing and the read
            problems = [f"unreadable ({exc})"]  # a link, FIFO or folder planted under an entry's name
        except (ValueError, KeyError, TypeError) as exc:
            problems = [f"unreadable ({exc})"]
        if problems:
            self.invalid_sidecars += 1
            warnings.warn(f"kvfast store: {path}: sidecar is invalid ({', '.join(problems)}); skipped (kvfast store "
                          "gc removes it)", RuntimeWarning, stacklevel=3)
            return None
        return entry

    def sidecar(self, key: StoreKey, reader: KvfReader, file_bytes: int, block_hashes: list[str], provenance: str,
                signature: dict[str, Any] | None) -> bytes:
        """The sidecar's bytes for a file about to be committed under ``key``."""
        m = reader.manifest
        body = {
            "store_version": STORE_VERSION, "fingerprint": key.fingerprint, "document_key": key.document,
            "num_tokens": m.num_tokens, "block_tokens": self.block_tokens, "token_sha256": m.token_sha256,
            "kv": {"num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                   "dtype": DTYPE_NAMES[m.dtype]},
            "kv_bytes": sum(c.raw_length for c in reader.chunks), "file_bytes": file_bytes, "created": time.time(),
            "block_hashes": "".join(block_hashes),
            "provenance": provenance,
        }
        if signature is not None:  # the publisher's sidecar and what ingest verified, for audits and re-export
            body["signature"] = signature
        return json.dumps(body, sort_keys=True).encode()
