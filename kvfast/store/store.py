"""Provider-side KV store: publish a document's KV once, serve many agents from shared blocks.

The data's path, and the module that handles each step:

    put:     source ──write, fsync──▶ ROOT/.tmp/x ──[key lock]── rename ──▶ <fp>/<key>.kvf ──▶ <fp>/<key>.json
                                                                            (tiers/disk.py; index.py reads sidecars)
    attach:  prompt ──hash chain──▶ longest stored prefix ──▶ resident root in this cache? ──fork──▶ agent
                                    (index.py)                  (tiers/device.py)
                                                               └─ no: host RAM tier ──copy──▶ root (tiers/ram.py)
                                                                   └─ no: disk ──kvfast.load──▶ root
    gc:      temp files, orphans, invalid sidecars, disk budget (gc.py)

This module is the facade: it holds the tiers, the counters and the trust policy, and hands each step to its
part. ``ROOT/LEDGER.jsonl`` (a tenant's: ``ROOT/.tenants/<tenant_id>/LEDGER.jsonl``) records every load it
serves (:class:`kvfast.Ledger`).
"""
from __future__ import annotations

import hmac
import os
import shutil
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvfast._fs import fsync_file
from kvfast.cache.pages import KVPages
from kvfast.cache.paged import KVSequence, PagedKVCache
from kvfast.errors import FormatError, InvalidArgumentError, ManifestError, SignatureError, TokenMismatchError
from kvfast.origin import Origin, OriginConfig
from kvfast.format import DTYPES, KvfReader, open_kvf, save_kv
from kvfast.hf.capture import publish as hf_publish
from kvfast.format.spec import token_array
from kvfast.identity import block_hashes, document_key
from kvfast.identity import fingerprint as model_fingerprint
from kvfast.loader import LoadHandle, load, load_into
from kvfast.loader.compat import check_fits
from kvfast.loader.handle import CompletedJob
from kvfast.loader.stream import RemoteReader
from kvfast.store import gc as gc_
from kvfast.store import readthrough
from kvfast.store.entry import (StoreEntry, StoreKey, StoreMatch, StoreStats, check_fingerprint, check_key,
                                check_tenant_id)
from kvfast.store.tiers.device import Root, DeviceTier
from kvfast.store.tiers.disk import DiskTier
from kvfast.store.tiers.origin import OriginTier
from kvfast.store.tiers.ram import RamTier
from kvfast.trust.ledger import Ledger
from kvfast.trust.signing import PublicKeyLike, read_sidecar, sig_path, trusted_key_ids, verify_signature

DEFAULT_RAM_BYTES = 1 << 30
MIN_TENANT_SALT_BYTES = 16  # a guessable salt would let another party compute the tenant's keys
PREFILL_PROVENANCE = "prefill"  # an entry this store computed itself with the model (Store.publish)
_OPEN_READERS = 32  # documents whose open, validated reader is kept for the next load (file descriptors)
_TOUCH_EVERY_S = 1.0  # how often an attach refreshes an entry's last-use time (its .kvf mtime) on disk


class Store:
    """A content-addressed store of documents' KV caches, shared by processes and served to paged caches.

    Several processes may publish into and read from one ``root`` at once (``fcntl.flock`` on a local
    file system). Entries are keyed by (model fingerprint, document key); :meth:`attach` finds the stored
    document sharing the longest prefix with a prompt and hands the caller a sequence over shared blocks.

    Args:
        root: the store's folder (created if absent).
        ram_bytes: budget of the host RAM tier (bytes of KV kept in this process's memory).
        device_blocks: budget, in blocks per paged cache, of the documents kept resident in a cache
            (None: up to the cache's capacity; unused documents are evicted when the cache runs short).
        disk_bytes: budget of the .kvf files on disk (None: unbounded); enforced by :meth:`put` and
            :meth:`gc`, least recently used first.
        block_tokens: tokens per hash-chain block, the granularity of prefix matches; fixed when the root
            is created (None: the root's, or 16 for a new root).
        tenant: the tenant's secret salt (at least 16 bytes), set by the server for the tenant it serves and
            never taken from a request. It is mixed (HMAC-SHA-256) into every document key and block hash, and
            the tenant's entries live in their own folder (``ROOT/.tenants/<tenant_id>/``): a store object of
            one tenant never hits, lists, counts or evicts another tenant's entries, and its lookups do not
            depend on them (no timing channel). None: the shared, unsalted namespace.
        trusted_keys: Ed25519 public keys (see :mod:`kvfast.trust.signing`). When given, :meth:`put` refuses a file
            whose signature sidecar (``doc.kvf.sig``) is missing, untrusted or does not match its bytes, and
            records the verification in the entry; :meth:`attach` refuses entries not signed by one of these
            keys (or computed by a store with the model, :meth:`publish`) with :class:`SignatureError`. The
            full digests are checked once, on ingest; attaching reads the record only.
        ledger: append a record of every served load to the usage ledger (:class:`kvfast.Ledger`): the root's, or
            for a tenant its own in its folder, so a tenant's ``ledger.records()`` holds only its own loads.
        origin: an S3-compatible object store below the disk tier, ``"s3://bucket/prefix"`` (or an
            :class:`kvfast.Origin`), shared by every node: :meth:`put` and :meth:`publish` also upload there
            (conditional creates: atomic, one object however many publishers race), :meth:`match` finds documents
            stored there without downloading them, and :meth:`attach` / :meth:`load_into` fetch a document found
            only there into the disk tier once per node (kvfast/store/tiers/origin.py, readthrough.py).
        origin_config: the origin's endpoint and credentials (None: the standard AWS environment variables).

    Example:
        >>> store = kvfast.Store("/srv/kv", ram_bytes=8 << 30)                      # doctest: +SKIP
        >>> store.publish(model, doc_ids)                                            # doctest: +SKIP
        >>> seq, n = store.attach(model, doc_ids + question_ids, cache)              # doctest: +SKIP
        >>> logits = kvfast.extend(model, cache, seq, (doc_ids + question_ids)[n:])  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, *, ram_bytes: int = DEFAULT_RAM_BYTES,
                 device_blocks: int | None = None, disk_bytes: int | None = None, block_tokens: int | None = None,
                 tenant: bytes | None = None, trusted_keys: Sequence[PublicKeyLike] | None = None,
                 ledger: bool = True, origin: str | Origin | None = None, origin_config: OriginConfig | None = None):
        if tenant is not None and (not isinstance(tenant, bytes) or len(tenant) < MIN_TENANT_SALT_BYTES):
            raise ValueError(f"tenant must be a secret salt of at least {MIN_TENANT_SALT_BYTES} bytes (e.g. "
                             "secrets.token_bytes(32), kept server-side), not a name a client could guess")
        for name, value in (("ram_bytes", ram_bytes), ("device_blocks", device_blocks), ("disk_bytes", disk_bytes)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.root = Path(root)
        self._salt = tenant
        self.tenant_id = "" if tenant is None else hmac.new(tenant, b"kvfast tenant id", "sha256").hexdigest()[:32]
        data = None if tenant is None else self.root / ".tenants" / check_tenant_id(self.tenant_id)
        self.disk = DiskTier(self.root, data, block_tokens)
        self.block_tokens = self.disk.block_tokens
        self.ram = RamTier(ram_bytes)
        self.device = DeviceTier(device_blocks, self.ram)
        self.disk_budget = disk_bytes
        self._trusted = None if trusted_keys is None else trusted_key_ids(trusted_keys)
        if self._trusted is not None and not self._trusted:
            raise ValueError("trusted_keys is empty: give at least one public key, or None to trust any entry")
        self.ledger = Ledger(self.disk.data) if ledger else None
        self._mutex = threading.RLock()
        self._num_params: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._last_used: dict[StoreKey, float] = {}  # monotonic time of the last attach
        self._last_touched: dict[StoreKey, float] = {}  # ... and of the last os.utime of its file
        self._counters = StoreStats()
        if isinstance(origin, str):
            origin = Origin(origin, origin_config)
        self.origin = None if origin is None else OriginTier(origin, self.tenant_id or "shared", self.disk.index)
        if self.origin is not None:
            for counter in (self._counters.hits, self._counters.bytes_read, self._counters.evictions):
                counter[OriginTier.name] = 0
        # path -> (its (device, inode, size) when opened, reader), least recently used first
        self._readers: OrderedDict[Path, tuple[tuple[int, int, int], KvfReader]] = OrderedDict()

    @property
    def ram_budget(self) -> int:
        return self.ram.budget

    @property
    def device_budget(self) -> int | None:
        return self.device.budget

    def __repr__(self) -> str:
        at = "" if self.origin is None else f", origin={self.origin.origin.url!r}"
        return f"Store({str(self.root)!r}, block_tokens={self.block_tokens}{at})"

    # -- keys ---------------------------------------------------------------------------------------------------
    def _salted(self, digest: str) -> str:
        """A document key or block hash in this tenant's namespace (unchanged without a tenant)."""
        if self._salt is None:
            return digest
        return hmac.new(self._salt, bytes.fromhex(digest), "sha256").hexdigest()

    def document_key(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """The key this store files a document of ``token_ids`` under (salted for a tenant)."""
        return self._salted(document_key(token_ids, self.block_tokens))

    def _block_hashes(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        return [self._salted(h) for h in block_hashes(token_ids, self.block_tokens)]

    @staticmethod
    def _fingerprint(model: Any) -> str:
        return check_fingerprint(model) if isinstance(model, str) else model_fingerprint(model)

    # -- publishing ----------------------------------------------------------------------------------------------
    def put(self, source: str | os.PathLike | KvfReader | tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]], *,
            token_ids: Sequence[int] | torch.Tensor | None = None, fingerprint: str | None = None,
            verify: bool = True, signature: str | os.PathLike | None = None,
            **save_kv_options: Any) -> StoreEntry:
        """Publish a document's KV into the store, atomically; a document already stored is a no-op.

        Args:
            source: a .kvf file (copied in, then every chunk's checksum is checked when ``verify``), an open
                :class:`KvfReader`, or ``(keys, values)``: per-layer tensors ``[num_tokens, H, D]`` as
                :func:`kvfast.save_kv` takes them.
            token_ids, fingerprint: with ``(keys, values)``, the document's token ids and the model's
                fingerprint (:func:`kvfast.fingerprint`).
            verify: check the copied file's chunk checksums before committing it.
            signature: a file's signature sidecar (default ``source + ".sig"`` when it exists). A store with
                ``trusted_keys`` requires it and verifies every byte of the copy against it before committing.
            save_kv_options: with ``(keys, values)``, passed to :func:`kvfast.save_kv` (``chunk_tokens``...).

        Returns:
            The stored entry (the existing one for a duplicate).

        Raises:
            FormatError (and subclasses): the source file is invalid or corrupted; nothing is stored.
            SignatureError: a store with ``trusted_keys`` got an unsigned, untrusted or altered artifact (or
                ``(keys, values)``, which carry no signature); nothing is stored.

        Example:
            >>> entry = store.put("doc.kvf")                                              # doctest: +SKIP
            >>> entry = store.put((keys, values), token_ids=ids, fingerprint=fp)          # doctest: +SKIP
        """
        if isinstance(source, (str, os.PathLike, KvfReader)):
            if token_ids is not None or fingerprint is not None or save_kv_options:
                raise TypeError("token_ids, fingerprint and save_kv options go with (keys, values), not a file")
            return self._put_file(source.path if isinstance(source, KvfReader) else Path(source), verify, signature)
        if signature is not None:
            raise TypeError("signature= goes with a .kvf file, not (keys, values)")
        if self._trusted is not None:
            raise SignatureError(f"{self.root}: this store only takes signed artifacts; (keys, values) carry no "
                                 "signature: save and sign them (kvfast.sign), or publish with the model")
        if token_ids is None or fingerprint is None:
            raise TypeError("put((keys, values), ...) needs token_ids= and fingerprint=")
        keys, values = source
        key = StoreKey(check_fingerprint(fingerprint), self.document_key(token_ids))
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self.disk.tmp_path(".kvf")
        try:
            save_kv(tmp, keys, values, token_ids, fingerprint=fingerprint, **save_kv_options)
            return self._commit(key, tmp, "unsigned", None)
        finally:
            tmp.unlink(missing_ok=True)

    def publish(self, model: Any, token_ids: Sequence[int] | torch.Tensor, **publish_options: Any) -> StoreEntry:
        """Prefill ``token_ids`` with ``model`` and put the KV (see :func:`kvfast.publish`); skips the prefill
        when the document is already stored.

        Example:
            >>> entry = store.publish(model, doc_ids)  # doctest: +SKIP
        """
        ids = torch.from_numpy(token_array(token_ids))
        key = StoreKey(model_fingerprint(model), self.document_key(ids))
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self.disk.tmp_path(".kvf")
        try:
            hf_publish(model, ids, tmp, **publish_options)
            return self._commit(key, tmp, PREFILL_PROVENANCE, None)
        finally:
            tmp.unlink(missing_ok=True)

    def _put_file(self, src: Path, verify: bool, signature: str | os.PathLike | None) -> StoreEntry:
        with open_kvf(src) as r:  # cheap: validates header and tokens, finds the key before any copy
            try:  # the fingerprint names the entry's folder: it must have the grammar a path may take
                key = StoreKey(check_fingerprint(r.manifest.fingerprint), self.document_key(r.token_ids))
            except InvalidArgumentError as exc:
                raise ManifestError(f"model.fingerprint: {exc}; not stored", path=src) from None
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self.disk.tmp_path(".kvf")
        try:
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
            # Check the bytes that will be committed, not the source (it may change under us).
            try:
                with open_kvf(tmp) as r:
                    if verify:
                        r.verify()
                    copied = StoreKey(r.manifest.fingerprint, self.document_key(r.token_ids))
            except FormatError as exc:  # name the caller's file, not the store's private copy of it
                raise type(exc)(f"{exc.detail}; not stored", path=src) from None
            if copied != key:
                raise FormatError("the file changed while it was being copied into the store; put it again",
                                  path=src)
            provenance, sig = self._check_signature(src, tmp, signature)
            return self._commit(key, tmp, provenance, sig)
        finally:
            tmp.unlink(missing_ok=True)

    def _check_signature(self, src: Path, tmp: Path,
                         signature: str | os.PathLike | None) -> tuple[str, dict[str, Any] | None]:
        """Ingest verification: every byte of our private copy against the publisher's signature, once.

        Returns the entry's provenance and the record kept in its sidecar.
        """
        if self._trusted is None:
            return "unsigned", None
        sig_file = Path(signature) if signature is not None else sig_path(src)
        try:
            side = read_sidecar(sig_file)  # read once: the sidecar checked is the sidecar recorded
            verified = verify_signature(tmp, self._trusted.values(), signature=side)
        except SignatureError as exc:
            raise SignatureError(f"{exc}; not stored", path=src) from None
        return f"signed:{verified.key_id}", {**side, "verified": {**verified.to_json(), "time": time.time()}}

    def _trusts(self, entry: StoreEntry) -> bool:
        if self._trusted is None or entry.provenance == PREFILL_PROVENANCE:
            return True
        kind, _, kid = entry.provenance.partition(":")
        return kind == "signed" and kid in self._trusted

    def reader(self, entry: StoreEntry) -> KvfReader:
        """The entry's file, open and validated (header, manifest, chunk index, token ids), kept open for the next
        call: a serving engine checks and loads a document on every request, and parsing it each time is not the
        copy. The file is stat'ed on each call; another file under the path (gc and a new put: another inode) is
        opened anew. Its times are not compared: serving a document refreshes its mtime (the disk tier's LRU
        clock), and a published file is never written in place (a chunk altered anyway fails its checksum).

        An entry matched only at the origin is read there, by ranged GETs, and not kept: nothing is fetched into a
        local tier until it is loaded (:meth:`load_into`, :meth:`attach`).

        Raises:
            FileNotFoundError: the file is gone. FormatError: it is not a valid .kvf file.
            OriginError: the entry is only at the origin, and the origin is unreachable or refuses.
        """
        if self.origin is not None and not entry.path.exists():
            return RemoteReader(self.origin.origin.source(self.origin.names(entry.key)[0]))
        st = os.stat(entry.path)
        stamp = (st.st_dev, st.st_ino, st.st_size)
        with self._mutex:
            held = self._readers.get(entry.path)
            if held is not None and held[0] == stamp:
                self._readers.move_to_end(entry.path)
                return held[1]
        reader = open_kvf(entry.path)
        st = os.fstat(reader.fileno())  # the file opened, which another put may have replaced since the stat
        with self._mutex:
            # Dropped, not closed: a load may still read through it (a reader closes itself when unreferenced).
            self._readers[entry.path] = ((st.st_dev, st.st_ino, st.st_size), reader)
            self._readers.move_to_end(entry.path)
            while len(self._readers) > _OPEN_READERS:
                self._readers.popitem(last=False)
        return reader

    def check_trusted(self, entry: StoreEntry) -> None:
        """Raise :class:`SignatureError` unless this store may serve ``entry`` (its ``trusted_keys`` policy)."""
        if not self._trusts(entry):
            raise SignatureError(f"entry is {entry.provenance}, not signed by a trusted key; put it again with its "
                                 "signature", path=entry.path)

    def _existing(self, key: StoreKey) -> StoreEntry | None:
        with self._mutex:
            entry = self.disk.index.get(key)
            if entry is None or not entry.path.exists():
                return None
            self._counters.duplicate_puts += 1
        if self.origin is not None:
            with self._mutex:
                there = self.origin.holds(key)
            if not there:
                self.push(key)  # stored here before (or while) the origin was unreachable: upload it now
        return entry

    def _commit(self, key: StoreKey, tmp: Path, provenance: str, signature: dict[str, Any] | None) -> StoreEntry:
        """Commit locally (:meth:`_commit_local`), then upload to the origin when there is one."""
        entry = self._commit_local(key, tmp, provenance, signature)
        if self.origin is not None:
            self.push(key)
        return entry

    def push(self, key: StoreKey | tuple[str, str]) -> bool:
        """Upload a local entry to the origin (document, then its index entry; each created only if absent).
        Returns whether this call created it there (False: it was there already).

        Raises:
            KeyError: no local entry under ``key``.
            OriginError: the origin is unreachable or refuses the upload (the local entry stays).
        """
        if self.origin is None:
            raise ValueError(f"{self.root}: this store has no origin; open it with Store(root, origin='s3://...')")
        key = check_key(key)  # it names objects at the origin: "../x" would reach another prefix
        kvf, side = self.disk.index.paths(key)
        try:
            sidecar = side.read_bytes()
        except FileNotFoundError:
            raise KeyError(f"{self.root}: no local entry {key.document[:16]}...") from None
        return self.origin.publish(key, kvf, sidecar)

    def grant(self, key: StoreKey | tuple[str, str], ttl_s: int = 3600) -> str:
        """A presigned HTTPS URL that lets its holder read one document at the origin (manifest and chunks: the
        .kvf object) for ``ttl_s`` seconds, and nothing else: ``kvfast.load(url, cache, model=model)``.

        Raises:
            KeyError: the origin holds no such document.
            OriginError: the origin is unreachable.

        Example:
            >>> url = store.grant(entry.key, ttl_s=3600)                  # doctest: +SKIP
            >>> seq = kvfast.load(url, cache, model=model)                # doctest: +SKIP (on another machine)
        """
        if self.origin is None:
            raise ValueError(f"{self.root}: this store has no origin; open it with Store(root, origin='s3://...')")
        if not isinstance(ttl_s, int) or not 1 <= ttl_s <= 7 * 24 * 3600:
            raise ValueError(f"ttl_s must be an int in [1, 604800] (S3 presigned URLs last at most 7 days), got "
                             f"{ttl_s!r}")
        key = check_key(key)  # it names objects at the origin: "../x" would reach another prefix
        with self._mutex:
            there = self.origin.holds(key) or key.document in self.origin.of(key.fingerprint, fresh=True).entries
        if not there:
            raise KeyError(f"{self.origin.origin.url}: no document {key.document[:16]}... for model "
                           f"{key.fingerprint[:19]}...; push it first")
        return self.origin.origin.presign(self.origin.names(key)[0], ttl_s)

    def _commit_local(self, key: StoreKey, tmp: Path, provenance: str,
                      signature: dict[str, Any] | None) -> StoreEntry:
        """Commit a complete, fsynced .kvf under ``key`` (tiers/disk.py), then enforce the disk budget."""
        with open_kvf(tmp) as r:
            sidecar = self.disk.index.sidecar(key, r, tmp.stat().st_size, self._block_hashes(r.token_ids),
                                              provenance, signature)
        # Never take self._mutex while holding a file lock (attach holds the mutex and may remove).
        committed = self.disk.commit(key, tmp, sidecar)
        with self._mutex:
            if committed:
                self._counters.puts += 1
            else:
                self._counters.duplicate_puts += 1
        # Another process may already have removed it again: that is a later state, not an error.
        folder = self.disk.index.folder(key.fingerprint)
        entry = (self.disk.index.read_sidecar(folder, key.document)
                 or self.disk.index.read_sidecar(folder, key.document, sidecar))
        with self._mutex:
            self.disk.index.of(key.fingerprint)  # the folder changed: the rescan picks the entry up
        gc_.enforce_disk_budget(self, protect=frozenset({key}))
        return entry

    # -- lookup ----------------------------------------------------------------------------------------------
    def get(self, key: StoreKey | tuple[str, str]) -> StoreEntry | None:
        """The entry stored under ``key`` = (fingerprint, document key), or None.

        Raises:
            InvalidArgumentError: the fingerprint or document key does not have its grammar (``sha256:`` and 64
                hex digits; 64 hex digits).

        Example:
            >>> store.get((kvfast.fingerprint(model), kvfast.document_key(doc_ids)))  # doctest: +SKIP
        """
        key = check_key(key)
        with self._mutex:
            return self.disk.index.get(key)

    def list(self, fingerprint: str | None = None) -> list[StoreEntry]:  # noqa: A003 - the store's listing
        """Every stored entry (of one model when ``fingerprint`` is given), sorted by key.

        Raises:
            InvalidArgumentError: ``fingerprint`` is not ``sha256:`` and 64 hex digits.
        """
        if fingerprint is not None:
            check_fingerprint(fingerprint)
        with self._mutex:
            return sorted(self.disk.index.entries(fingerprint), key=lambda e: e.key)

    def match(self, model: Any, prompt_token_ids: Sequence[int] | torch.Tensor) -> StoreMatch | None:
        """The stored document sharing the longest prefix with a prompt, for ``model``.

        Walks the prompt's block hash chain (:func:`kvfast.block_hashes`) through the stored chains: the
        match is block-aligned, or covers a whole stored document (partial last block included) when the
        prompt starts with all of it. Among equal matches, one resident in RAM wins, then the most recently used.

        Args:
            model: the model (or its fingerprint string) the KV must come from.
            prompt_token_ids: the prompt.

        Returns:
            A :class:`StoreMatch` (entry and tokens covered), or None when not even one block matches.

        Example:
            >>> m = store.match(model, doc_ids[:1000] + question_ids)  # doctest: +SKIP
            >>> m.num_tokens                                             # doctest: +SKIP
            992
        """
        with self._mutex:
            return self._match(self._fingerprint(model), token_array(prompt_token_ids), None)

    def _match(self, fp: str, ids: np.ndarray, cache: PagedKVCache | None) -> StoreMatch | None:
        """The longest match in the local tiers, else (when longer) at the origin: a match found only there is an
        entry whose ``path`` does not exist yet (:meth:`_local` fetches it)."""
        chain = self._block_hashes(ids)
        local = self._match_in(self.disk.index.of(fp), chain, ids, cache)
        if self.origin is None or (local is not None and local.num_tokens == len(ids)):
            return local
        remote = self._match_in(self.origin.of(fp), chain, ids, None)
        return remote if remote is not None and (local is None or remote.num_tokens > local.num_tokens) else local

    def _local(self, entry: StoreEntry) -> tuple[StoreEntry, bool]:
        """``entry`` on this node's disk, fetched from the origin first when it is only there: (entry, fetched)."""
        if self.origin is None or entry.path.exists():
            return entry, False
        return readthrough.fetch(self, entry)

    def _match_in(self, idx: Any, chain: list[str], ids: np.ndarray,
                  cache: PagedKVCache | None) -> StoreMatch | None:
        if not idx.entries:
            return None
        matched = 0  # stored chains are prefix-closed, so the first miss ends the walk
        while matched < len(chain) and chain[matched] in idx.by_hash:
            matched += 1
        tail = chain[matched - 1] if matched else ""
        # A document whose full blocks are exactly the matched ones, followed by a partial block, matches
        # whole when the prompt goes on with that partial block: the document key proves it.
        candidates = []
        for doc in idx.by_tail.get(tail, ()):
            e = idx.entries[doc]
            if e.num_tokens <= len(ids) and self.document_key(ids[: e.num_tokens]) == doc:
                candidates.append((e.num_tokens, e))
        if not candidates and matched:
            candidates = [(matched * self.block_tokens, idx.entries[doc]) for doc in idx.by_hash[tail]]
        if not candidates:
            return None

        def rank(c: tuple[int, StoreEntry]) -> tuple:
            n, e = c
            return (n, cache is not None and self.device.holds(e.key, cache), self.ram.holds(e.key),
                    self._last_used.get(e.key, 0.0), e.key.document)

        n, entry = max(candidates, key=rank)
        return StoreMatch(entry, n)

    # -- serving ---------------------------------------------------------------------------------------------
    def attach(self, model: Any, prompt_token_ids: Sequence[int] | torch.Tensor, cache: PagedKVCache, *,
               min_rest: int = 1, verify: bool = True) -> tuple[KVSequence, int]:
        """Attach the longest stored prefix of a prompt to ``cache``; the caller prefills only the rest.

        The matched document is made resident once per cache (found there, copied from the RAM tier, or
        loaded from disk with :func:`kvfast.load`) as a root sequence; each caller gets a fork of its first
        ``n`` tokens, sharing its blocks. The caller's own tokens go into its own blocks (a shared, partly
        filled last block is copied on write). Free the returned sequence with ``cache.free(seq)``.

        Args:
            model: the model (or its fingerprint string) that will continue; the KV must come from it.
            prompt_token_ids: the whole prompt.
            cache: the paged cache to attach into; its shape and dtype must match the document's.
            min_rest: reuse at most ``len(prompt) - min_rest`` tokens, so the caller has tokens left to
                compute the next token's logits from (default 1, as vLLM does; 0 allows reusing all).
            verify: check chunk checksums when reading from disk.

        Returns:
            ``(seq, n)``: a new sequence holding the prompt's first ``n`` tokens (``n = 0`` and an empty
            sequence when nothing matched), and ``n``. Continue with
            ``kvfast.extend(model, cache, seq, prompt[n:])``.

        Raises:
            ShapeMismatchError, DtypeMismatchError: the cache (or model) does not fit the stored KV.
            SignatureError: the store has ``trusted_keys`` and the matched entry is not signed by one of them.
            CacheFullError: not enough free blocks even after evicting unused documents.

        Example:
            >>> seq, n = store.attach(model, prompt, cache)             # doctest: +SKIP
            >>> logits = kvfast.extend(model, cache, seq, prompt[n:])   # doctest: +SKIP
        """
        if min_rest < 0:
            raise ValueError(f"min_rest must be >= 0, got {min_rest}")
        ids = token_array(prompt_token_ids)
        fp = self._fingerprint(model)
        started = time.perf_counter()
        with self._mutex:
            self._counters.attaches += 1
            for _ in range(3):  # another process may remove the matched entry under us: match again
                m = self._match(fp, ids, cache)
                n = 0 if m is None else min(m.num_tokens, len(ids) - min_rest)
                if n <= 0:
                    break
                e = m.entry
                check_fits((e.num_layers, e.num_kv_heads, e.head_dim), DTYPES[e.dtype], cache.pages.kv_shape,
                           cache.dtype, model=model, path=e.path)
                self.check_trusted(e)
                e, fetched = self._local(e)  # raises OriginError, ChecksumError: nothing was cached
                self.check_trusted(e)
                try:
                    root, tier, owned = self._resident(e, cache, verify)
                    tier = "origin" if fetched else tier
                except FileNotFoundError:
                    self._forget(e.key)
                    continue
                except FormatError as exc:
                    self._set_aside(e, exc)
                    continue
                if not np.array_equal(root.token_ids[:n], ids[:n]):
                    raise TokenMismatchError(f"stored token ids differ from the prompt's first {n}; the entry "
                                             "is inconsistent: remove it and publish again", path=e.path)
                seq = cache.fork(root.seq, n)
                if owned:  # loaded over the device budget: the caller's fork holds it alone
                    cache.free(root.seq)
                try:  # a load that cannot be billed is not served
                    # device: shared without a copy; ram, disk: the whole document was copied into the cache
                    nbytes = n * e.bytes_per_token if tier == "device" else root.nbytes
                    self._served(e, tier, n, model, time.perf_counter() - started, nbytes)
                except BaseException:
                    cache.free(seq)
                    raise
                return seq, n
            self._counters.misses += 1
            return cache.new_sequence(), 0

    def load_into(self, key: StoreKey | tuple[str, str], pages: KVPages, block_ids: Sequence[int] | np.ndarray,
                  token_ids: Sequence[int] | np.ndarray | torch.Tensor, *, verify: bool = True,
                  blocking: bool = True) -> LoadHandle:
        """Load the first ``len(token_ids)`` tokens of a stored document into pages the caller owns (a serving
        engine's), at ``block_ids``: :func:`kvfast.load_into` with the store's guarantees. The entry must be
        trusted (``trusted_keys``), its tokens must be ``token_ids``, the bytes come from the RAM tier when the
        document is there, else from disk (read through the RAM tier when the document fits its budget, so the
        next load is one copy from memory), and the load is recorded in the usage ledger once it has landed.

        Raises:
            InvalidArgumentError: the fingerprint or document key does not have its grammar.
            KeyError: no entry under ``key``.
            SignatureError: the store has ``trusted_keys`` and the entry is not signed by one of them.
            Everything :func:`kvfast.load_into` raises.

        Example:
            >>> handle = store.load_into(match.entry.key, pages, vllm_block_ids, prompt[:n])  # doctest: +SKIP
            >>> handle.wait_layer(0)                                                          # doctest: +SKIP
        """
        key = check_key(key)
        ids = token_array(token_ids)
        started = time.perf_counter()
        with self._mutex:
            entry = self.disk.index.get(key)
            fetched = False
            if entry is None and self.origin is not None and self.origin.holds(key):
                entry, fetched = self._local(self.origin.of(key.fingerprint).entries[key.document])
            if entry is None:
                raise KeyError(f"{self.root}: no entry {key.document[:16]}... for model {key.fingerprint[:19]}...")
            self.check_trusted(entry)
            ram, tier = self.ram.get(key), "ram"
            if ram is None and self.ram.fits(entry, pages):
                # read through: next time from RAM
                ram, tier = self.ram.read(entry, pages, verify), "origin" if fetched else "disk"
            if ram is not None:
                check_fits((entry.num_layers, entry.num_kv_heads, entry.head_dim), DTYPES[entry.dtype],
                           pages.kv_shape, pages.dtype, path=entry.path)
                if not 1 <= len(ids) <= ram.num_tokens or not np.array_equal(ram.token_ids[: len(ids)], ids):
                    raise TokenMismatchError(f"the prompt's first {len(ids)} tokens are not this document's",
                                             path=entry.path)
                table = pages.check_block_ids(block_ids, len(ids))
                self.ram.copy_into(ram, pages, table, len(ids))
                self._served(entry, tier, len(ids), key.fingerprint, time.perf_counter() - started,
                             len(ids) * entry.bytes_per_token)
                return LoadHandle(CompletedJob(), num_layers=pages.num_layers, num_tokens=len(ids), backend="native",
                                  method=tier, device=pages.device)

        def record(error: BaseException | None) -> None:
            if error is None:
                with self._mutex:
                    self._served(entry, "origin" if fetched else "disk", len(ids), key.fingerprint,
                                 time.perf_counter() - started,
                                 len(ids) * entry.bytes_per_token)

        handle = load_into(self.reader(entry), pages, block_ids, fingerprint=key.fingerprint, num_tokens=len(ids),
                           token_ids=ids, verify=verify, blocking=blocking)
        handle.add_done_callback(record)
        return handle

    def _served(self, entry: StoreEntry, tier: str, n: int, model: Any, seconds: float, nbytes: int) -> None:
        """Count a load of ``n`` tokens served from ``tier`` (``nbytes`` read from it) and append its ledger
        record."""
        c = self._counters
        c.loads_served += 1
        c.hits[tier] += 1
        c.tokens_reused += n
        c.bytes_read[tier] += nbytes
        if not isinstance(model, str):
            if model not in self._num_params:
                self._num_params[model] = sum(p.numel() for p in model.parameters())
            c.prefill_flops_saved += 2.0 * self._num_params[model] * n
        now = time.monotonic()
        self._last_used[entry.key] = now
        if now - self._last_touched.get(entry.key, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
            self._last_touched[entry.key] = now
            self.disk.touch(entry)
        if self.ledger is not None:
            self.ledger.append(tenant=self.tenant_id, fingerprint=entry.key.fingerprint, document=entry.key.document,
                               tokens=n, nbytes=n * entry.bytes_per_token, tier=tier, seconds=seconds,
                               time_s=time.time())

    def _resident(self, entry: StoreEntry, cache: PagedKVCache, verify: bool) -> tuple[Root, str, bool]:
        """The document's root in ``cache``, made resident from RAM or disk when needed: (root, the tier it came
        from, whether the caller owns it alone because it did not fit the device budget)."""
        key = entry.key
        root = self.device.get(cache, key)
        if root is not None:
            return root, "device", False
        # The RAM tier is inclusive: a document's bytes never change, so its host copy stays valid while it
        # is resident, and a later eviction from the cache costs no copy (held here even if the RAM tier
        # drops it while room is made below).
        ram = self.ram.get(key)
        self.device.make_room(cache, cache.blocks_for(entry.num_tokens))
        if ram is not None:
            root, source = Root(self.ram.load(ram, cache), ram.token_ids, entry.num_tokens, entry.kv_bytes), "ram"
        else:
            with open_kvf(entry.path) as reader:
                if reader.manifest.fingerprint != key.fingerprint:
                    raise FormatError("file's fingerprint differs from its store entry", path=entry.path)
                seq = load(reader, cache, fingerprint=key.fingerprint, verify=verify)
                root = Root(seq, reader.token_ids.numpy(), entry.num_tokens, entry.kv_bytes)
            source = "disk"
        return root, source, not self.device.adopt(cache, key, root)

    def evict(self, cache: PagedKVCache | None = None) -> int:
        """Free every resident document no agent shares (of ``cache``, or of all caches), keeping host copies
        in the RAM tier as its budget allows. Returns the number of blocks freed."""
        with self._mutex:
            return self.device.evict(cache)

    def close(self) -> None:
        """Drop every resident root and the RAM tier. Agents' sequences stay valid (they hold their blocks)."""
        with self._mutex:
            self.device.clear()
            self.ram.clear()

    def in_use(self, key: StoreKey) -> bool:
        """Whether an agent shares the document's blocks in a cache (then no budget evicts it)."""
        with self._mutex:
            return self.device.in_use(key)

    # -- removal and garbage collection ----------------------------------------------------------------------
    def remove(self, key: StoreKey | tuple[str, str]) -> bool:
        """Delete an entry from disk and from every tier; returns whether it existed.

        Agents attached to it keep their sequences. The sidecar goes first (the entry disappears
        atomically), then the .kvf file.

        Raises:
            InvalidArgumentError: the fingerprint or document key does not have its grammar; nothing is touched.
        """
        key = check_key(key)  # before any path is made of it: "../x" or "/x" would name files outside the store
        existed = self.disk.remove(key)
        self._forget(key)
        return existed

    def _forget(self, key: StoreKey) -> None:
        with self._mutex:
            self.disk.index.forget(key)
            self.ram.forget(key)
            self.device.forget(key)

    def _set_aside(self, entry: StoreEntry, exc: Exception) -> None:
        warnings.warn(f"kvfast store: {entry.path}: {exc}; entry removed", RuntimeWarning, stacklevel=3)
        self._counters.corrupt += 1
        self.remove(entry.key)

    def count_eviction(self, tier: str) -> None:
        with self._mutex:
            self._counters.evictions[tier] += 1

    def gc(self, *, verify: bool = False) -> dict[str, int]:
        """Clean the root: temp files of dead writers, .kvf files without a sidecar (a publish cut short),
        invalid sidecars, corrupted files (with ``verify``), then entries over the disk budget.

        Returns:
            Counts: ``temp_files``, ``orphans``, ``corrupt``, ``evicted``, and what remains: ``entries``,
            ``disk_bytes``.

        Example:
            >>> store.gc(verify=True)  # doctest: +SKIP
            {'temp_files': 1, 'orphans': 0, 'corrupt': 0, 'evicted': 0, 'entries': 12, 'disk_bytes': 50331648}
        """
        return gc_.collect(self, verify=verify)

    # -- metrics ---------------------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        """A snapshot of the tiers' sizes (disk: every process's entries) and this object's counters."""
        entries = self.list()
        with self._mutex:
            s = StoreStats(**asdict(self._counters))
            s.corrupt += self.disk.index.invalid_sidecars
            s.evictions["device"] += self.device.evictions
            s.evictions["ram"] += self.ram.evictions
            s.entries, s.disk_bytes, s.disk_budget = len(entries), sum(e.file_bytes for e in entries), self.disk_budget
            s.ram_entries, s.ram_bytes, s.ram_budget = len(self.ram), self.ram.used(), self.ram.budget
            s.device_budget = self.device.budget
            s.device_documents, s.device_blocks, s.device_bytes = self.device.totals()
            return s

    def device_blocks_used(self, cache: PagedKVCache) -> int:
        """Blocks of ``cache`` held by this store's resident documents (the device tier's usage)."""
        with self._mutex:
            return self.device.used(cache)
