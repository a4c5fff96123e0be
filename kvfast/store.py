"""Provider-side KV store: publish a document's KV once, serve many agents from shared blocks.

The data's path (DESIGN.md §7):

    put:     source ──write, fsync──▶ ROOT/.tmp/x ──[key lock]── rename ──▶ <fp>/<key>.kvf ──▶ <fp>/<key>.json
    attach:  prompt ──hash chain──▶ longest stored prefix ──▶ resident root in this cache? ──fork──▶ agent
                                                               └─ no: host RAM tier ──copy──▶ root
                                                                   └─ no: disk ──kvfast.load──▶ root

The directory is the index. Nothing on disk is ever modified in place, so a crash (or ``kill -9``) at any
point leaves either the old state or the new one:

    ROOT/STORE.json                      store settings (block_tokens), written once
    ROOT/<fp>/<document_key>.kvf         the KV, an ordinary .kvf file (docs/FORMAT.md)
    ROOT/<fp>/<document_key>.json        sidecar: identity, shape, block hash chain. Its rename COMMITS the
                                         entry: no sidecar, no entry (an orphan .kvf is removed by gc)
    ROOT/.tmp/<pid>-<random>.*           files being written; gc removes those whose writer is dead
    ROOT/.locks/<xx>.lock                fcntl.flock stripes, by the document key's first two hex digits
    ROOT/.tenants/<tenant_id>/<fp>/...   a tenant's entries (Store(tenant=salt)), keys salted with HMAC
    ROOT/LEDGER.jsonl, ROOT/LEDGER.head  the usage ledger: one hash-chained record per load (kvfast.ledger)

``<fp>`` is the model fingerprint made file-name safe (``sha256:ab..`` -> ``sha256-ab..``) and
``<document_key>`` is :func:`kvfast.document_key` of the token ids with the store's ``block_tokens``.

Tiers, fastest first: blocks of a :class:`PagedKVCache` (one resident "root" sequence per (cache,
document); agents get ``cache.fork(root, n)``, so N agents hold the document once), host RAM (pinned when
CUDA is present; a document evicted from a cache is kept there as its pages, and stays there when it becomes
resident again: its bytes never change, so the next eviction copies nothing), disk (the source of truth;
every entry lives there). Each tier has a budget and evicts least recently used first; a root that any agent
still shares is in use and never evicted.

Locking: publishers write their file without any lock, then take the flock of the key's stripe only for
the two renames (and the duplicate check); ``remove`` and ``gc`` take the same lock, so a sidecar never
points at a missing file. Readers take no lock: they open files that are complete by construction.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shutil
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from kvfast.errors import DtypeMismatchError, FormatError, ShapeMismatchError, TokenMismatchError
from kvfast.fingerprint import block_hashes, document_key
from kvfast.fingerprint import fingerprint as model_fingerprint
from kvfast.format import DTYPE_NAMES, DTYPES, KvfReader, _fsync_dir, open_kvf, save_kv
from kvfast.hf import publish as hf_publish
from kvfast.ledger import Ledger
from kvfast.loader import load
from kvfast.paged import KVSequence, PagedKVCache
from kvfast.sign import PublicKeyLike, SignatureError, read_sidecar, sig_path, trusted_key_ids, verify_signature

STORE_VERSION = 1
DEFAULT_BLOCK_TOKENS = 16  # tokens per hash-chain block: the granularity of prefix matches
DEFAULT_RAM_BYTES = 1 << 30
TIERS = ("device", "ram", "disk")
MIN_TENANT_SALT_BYTES = 16  # a guessable salt would let another party compute the tenant's keys
PREFILL_PROVENANCE = "prefill"  # an entry this store computed itself with the model (Store.publish)
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_FP_RE = re.compile(r"([a-z0-9]{1,16}):([0-9a-f]{16,128})")
_TMP_RE = re.compile(r"\.?(\d+)-")
_TMP_MAX_AGE_S = 24 * 3600  # a temp file this old is dead even if its pid was reused by a live process
# Linux stamps files with a coarse clock (a few ms): a directory changed again within the same tick keeps
# its mtime, so a scan is trusted for later calls only once the directory's mtime is this far in the past.
_MTIME_SETTLE_NS = 1_000_000_000
_TOUCH_EVERY_S = 1.0  # how often an attach refreshes an entry's last-use time (its .kvf mtime) on disk

# Test hook: called with a phase name at each step of a publish or remove (tests kill the process there).
_failpoint_hook: Callable[[str], None] | None = None


def _failpoint(name: str) -> None:
    if _failpoint_hook is not None:
        _failpoint_hook(name)


# -- identity ---------------------------------------------------------------------------------------------
class StoreKey(NamedTuple):
    """What a store entry is keyed by: the model that made the KV and the document it holds."""

    fingerprint: str  # kvfast.fingerprint(model)
    document: str  # kvfast.document_key(token_ids, block_tokens), 64 hex digits


@dataclass(frozen=True)
class StoreEntry:
    """One stored document, as its sidecar describes it.

    Attributes:
        key: (fingerprint, document key).
        path: the .kvf file.
        num_tokens: document length.
        num_layers, num_kv_heads, head_dim, dtype: the KV's shape and dtype name (``"bfloat16"``...).
        kv_bytes: bytes of K and V over all layers (what a full load moves).
        file_bytes: size of the .kvf file.
        created: publish time (seconds since the epoch).
        block_hashes: the hash chain over the document's full blocks (``num_tokens // block_tokens`` hex).
        provenance: ``"signed:<key id>"`` (its signature was verified on ingest), ``"prefill"`` (this store
            computed it with the model) or ``"unsigned"``.
    """

    key: StoreKey
    path: Path
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    kv_bytes: int
    file_bytes: int
    created: float
    block_hashes: tuple[str, ...] = field(repr=False)
    provenance: str = "unsigned"

    @property
    def bytes_per_token(self) -> int:
        return self.kv_bytes // self.num_tokens

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.key.fingerprint, "document_key": self.key.document, "path": str(self.path),
                "num_tokens": self.num_tokens, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "kv_bytes": self.kv_bytes,
                "file_bytes": self.file_bytes, "created": self.created, "provenance": self.provenance}


@dataclass(frozen=True)
class StoreMatch:
    """The result of :meth:`Store.match`: the stored document sharing the longest prefix with a prompt.

    Attributes:
        entry: the document.
        num_tokens: how many leading prompt tokens it covers: a multiple of ``block_tokens``, or the whole
            document when the prompt starts with all of it (its trailing partial block included).
    """

    entry: StoreEntry
    num_tokens: int


@dataclass
class StoreStats:
    """Counters of one :class:`Store` object (this process) and the sizes of its tiers.

    Attributes:
        entries, disk_bytes, disk_budget: documents on disk (all processes), their .kvf bytes, the budget.
        ram_entries, ram_bytes, ram_budget: the host RAM tier of this process.
        device_documents, device_blocks, device_bytes, device_budget: resident roots over all caches, the
            blocks and bytes they hold, and the per-cache block budget (None: the cache's capacity).
        attaches: calls of :meth:`Store.attach`; loads_served: those that reused at least one token;
            misses: those that reused none.
        hits: loads served per tier the prefix came from.
        bytes_read: per tier, KV bytes served: "device" is shared without a copy, "ram" copied from host
            RAM, "disk" read from .kvf files.
        tokens_reused: prompt tokens attached instead of prefilled.
        prefill_flops_saved: ``2 * num_parameters * tokens_reused`` over attaches given a model (the usual
            forward-pass estimate: 2 FLOPs per parameter per token; attention-score FLOPs left out).
        evictions: per tier. puts, duplicate_puts: publishes that wrote, and no-op repeats.
        corrupt: entries found unreadable and set aside (their sidecar removed).
    """

    entries: int = 0
    disk_bytes: int = 0
    disk_budget: int | None = None
    ram_entries: int = 0
    ram_bytes: int = 0
    ram_budget: int = 0
    device_documents: int = 0
    device_blocks: int = 0
    device_bytes: int = 0
    device_budget: int | None = None
    attaches: int = 0
    loads_served: int = 0
    misses: int = 0
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    tokens_reused: int = 0
    prefill_flops_saved: float = 0.0
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    puts: int = 0
    duplicate_puts: int = 0
    corrupt: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- in-memory state ----------------------------------------------------------------------------------------
@dataclass
class _DirIndex:
    """What one fingerprint folder holds, rebuilt from the folder whenever its mtime moves."""

    stamp: tuple[int, int] | None = None  # (mtime_ns, inode) at the last trusted scan
    entries: dict[str, StoreEntry] = field(default_factory=dict)
    by_hash: dict[str, set[str]] = field(default_factory=dict)  # block hash -> documents with that prefix
    by_tail: dict[str, set[str]] = field(default_factory=dict)  # last full-block hash ("" if none) -> documents
                                                                # that end in a partial block
    invalid: dict[str, tuple[int, int]] = field(default_factory=dict)  # document -> (inode, mtime_ns) of a bad
                                                                        # sidecar, so it is reported once


@dataclass
class _Root:
    """A document resident in a paged cache; agents are forks of ``seq``."""

    seq: KVSequence
    token_ids: np.ndarray  # [num_tokens] int64, checked against every attached prompt
    num_tokens: int
    nbytes: int


@dataclass
class _DeviceTier:
    roots: OrderedDict[StoreKey, _Root] = field(default_factory=OrderedDict)  # least recently used first
    blocks: int = 0


@dataclass
class _RamEntry:
    """A document in host memory, as the pages of the cache it was evicted from (so it goes back in one copy)."""

    pages: torch.Tensor  # [num_layers, 2, num_blocks, *page], page as in `layout`; pinned when CUDA is present
    layout: str  # "NHD": page = [block_size, H, D]; "HND": page = [H, block_size, D]
    num_tokens: int
    token_ids: np.ndarray  # [num_tokens] int64

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    @property
    def block_size(self) -> int:
        return self.pages.shape[3] if self.layout == "NHD" else self.pages.shape[4]

    def tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[num_tokens, H, D]`` (views when the layout is NHD)."""
        kv = self.pages[layer] if self.layout == "NHD" else self.pages[layer].transpose(2, 3)
        kv = kv.reshape(2, -1, *kv.shape[-2:])[:, : self.num_tokens]  # [2, num_tokens, H, D]
        return kv[0], kv[1]


def _fp_dirname(fp: str) -> str:
    """A file-name-safe, injective folder name for a fingerprint."""
    m = _FP_RE.fullmatch(fp)
    if m:
        return f"{m[1]}-{m[2]}"
    return "fp-" + hashlib.sha256(fp.encode()).hexdigest()


def _token_array(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """Token ids as a ``[n]`` int64 array (hashing and comparing it is far cheaper than a Python list)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    return np.asarray(token_ids, dtype=np.int64).reshape(-1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the store -----------------------------------------------------------------------------------------------
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
        trusted_keys: Ed25519 public keys (see :mod:`kvfast.sign`). When given, :meth:`put` refuses a file
            whose signature sidecar (``doc.kvf.sig``) is missing, untrusted or does not match its bytes, and
            records the verification in the entry; :meth:`attach` refuses entries not signed by one of these
            keys (or computed by a store with the model, :meth:`publish`) with :class:`SignatureError`. The
            full digests are checked once, on ingest; attaching reads the record only.
        ledger: append a record of every served load to the root's usage ledger (:class:`kvfast.Ledger`).

    Example:
        >>> store = kvfast.Store("/srv/kv", ram_bytes=8 << 30)                      # doctest: +SKIP
        >>> store.publish(model, doc_ids)                                            # doctest: +SKIP
        >>> seq, n = store.attach(model, doc_ids + question_ids, cache)              # doctest: +SKIP
        >>> logits = kvfast.extend(model, cache, seq, (doc_ids + question_ids)[n:])  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, *, ram_bytes: int = DEFAULT_RAM_BYTES,
                 device_blocks: int | None = None, disk_bytes: int | None = None, block_tokens: int | None = None,
                 tenant: bytes | None = None, trusted_keys: Sequence[PublicKeyLike] | None = None,
                 ledger: bool = True):
        if tenant is not None and (not isinstance(tenant, bytes) or len(tenant) < MIN_TENANT_SALT_BYTES):
            raise ValueError(f"tenant must be a secret salt of at least {MIN_TENANT_SALT_BYTES} bytes (e.g. "
                             "secrets.token_bytes(32), kept server-side), not a name a client could guess")
        for name, value in (("ram_bytes", ram_bytes), ("device_blocks", device_blocks), ("disk_bytes", disk_bytes)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.root = Path(root)
        self.ram_budget, self.device_budget, self.disk_budget = ram_bytes, device_blocks, disk_bytes
        self._tmp, self._locks = self.root / ".tmp", self.root / ".locks"
        for d in (self.root, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)
        self.block_tokens = self._settings(block_tokens)
        self._salt = tenant
        self.tenant_id = "" if tenant is None else hmac.new(tenant, b"kvfast tenant id", "sha256").hexdigest()[:32]
        self._data = self.root if tenant is None else self.root / ".tenants" / self.tenant_id  # entries' folders
        self._data.mkdir(parents=True, exist_ok=True)
        self._trusted = None if trusted_keys is None else trusted_key_ids(trusted_keys)
        if self._trusted is not None and not self._trusted:
            raise ValueError("trusted_keys is empty: give at least one public key, or None to trust any entry")
        self.ledger = Ledger(self.root) if ledger else None
        self._mutex = threading.RLock()
        self._dirs: dict[str, _DirIndex] = {}
        self._device: weakref.WeakKeyDictionary[PagedKVCache, _DeviceTier] = weakref.WeakKeyDictionary()
        self._ram: OrderedDict[StoreKey, _RamEntry] = OrderedDict()  # least recently used first
        self._ram_used = 0
        self._num_params: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._last_used: dict[StoreKey, float] = {}  # monotonic time of the last attach
        self._last_touched: dict[StoreKey, float] = {}  # ... and of the last os.utime of its file
        self._counters = StoreStats()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, block_tokens={self.block_tokens})"

    # -- root settings and locks ----------------------------------------------------------------------------
    def _settings(self, block_tokens: int | None) -> int:
        path = self.root / "STORE.json"
        if not path.exists():
            with self._flock("root"):
                if not path.exists():
                    body = {"store_version": STORE_VERSION, "block_tokens": block_tokens or DEFAULT_BLOCK_TOKENS}
                    tmp = self._tmp_path(".json")
                    _write_durable(tmp, json.dumps(body).encode())
                    os.replace(tmp, path)
                    _fsync_dir(self.root)
        try:
            body = json.loads(path.read_bytes())
            version, stored = body["store_version"], body["block_tokens"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"store settings are unreadable ({exc}); restore or delete the file", path=path) from None
        if version != STORE_VERSION:
            raise FormatError(f"store version {version} is not supported (this kvfast reads {STORE_VERSION})",
                              path=path)
        if not isinstance(stored, int) or stored < 1:
            raise FormatError(f"block_tokens must be a positive int, got {stored!r}", path=path)
        if block_tokens is not None and block_tokens != stored:
            raise ValueError(f"{self.root} was created with block_tokens={stored}; open it with that value "
                             "(or leave block_tokens out)")
        return stored

    @contextlib.contextmanager
    def _flock(self, stripe: str) -> Iterator[None]:
        """An exclusive lock shared by every process on this root (``fcntl.flock``), one per stripe."""
        fd = os.open(self._locks / f"{stripe}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _key_lock(self, key: StoreKey) -> contextlib.AbstractContextManager[None]:
        return self._flock(key.document[:2])

    def _salted(self, digest: str) -> str:
        """A document key or block hash in this tenant's namespace (unchanged without a tenant)."""
        if self._salt is None:
            return digest
        return hmac.new(self._salt, bytes.fromhex(digest), "sha256").hexdigest()

    def _document_key(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        return self._salted(document_key(token_ids, self.block_tokens))

    def _block_hashes(self, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[str]:
        return [self._salted(h) for h in block_hashes(token_ids, self.block_tokens)]

    def _tmp_path(self, suffix: str) -> Path:
        return self._tmp / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    def _paths(self, key: StoreKey) -> tuple[Path, Path]:
        folder = self._data / _fp_dirname(key.fingerprint)
        return folder / f"{key.document}.kvf", folder / f"{key.document}.json"

    # -- the index: the directory itself ---------------------------------------------------------------------
    def _dir_index(self, dirname: str) -> _DirIndex:
        """The folder's entries, rescanned when its mtime moved (other processes publish and remove)."""
        idx = self._dirs.setdefault(dirname, _DirIndex())
        folder = self._data / dirname
        try:
            st = os.stat(folder)
        except FileNotFoundError:
            for doc in list(idx.entries):
                self._unindex(idx, doc)
            idx.stamp = None
            return idx
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == idx.stamp:
            return idx
        names = {n[:-5] for n in os.listdir(folder) if n.endswith(".json") and _KEY_RE.fullmatch(n[:-5])}
        for doc in set(idx.entries) - names:
            self._unindex(idx, doc)
        idx.invalid = {doc: v for doc, v in idx.invalid.items() if doc in names}
        for doc in names - set(idx.entries):
            try:
                side = os.stat(folder / f"{doc}.json")
            except FileNotFoundError:
                continue
            if idx.invalid.get(doc) == (side.st_ino, side.st_mtime_ns):
                continue
            entry = self._read_sidecar(folder, doc)
            if entry is not None:
                self._index_entry(idx, entry)
            else:
                idx.invalid[doc] = (side.st_ino, side.st_mtime_ns)
        settled = time.time_ns() - st.st_mtime_ns > _MTIME_SETTLE_NS
        idx.stamp = stamp if settled else None
        return idx

    def _index_of(self, fp: str) -> _DirIndex:
        return self._dir_index(_fp_dirname(fp))

    def _index_entry(self, idx: _DirIndex, entry: StoreEntry) -> None:
        doc = entry.key.document
        idx.entries[doc] = entry
        for h in entry.block_hashes:
            idx.by_hash.setdefault(h, set()).add(doc)
        if entry.num_tokens % self.block_tokens:
            idx.by_tail.setdefault(entry.block_hashes[-1] if entry.block_hashes else "", set()).add(doc)

    def _unindex(self, idx: _DirIndex, doc: str) -> None:
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

    def _read_sidecar(self, folder: Path, doc: str, raw: bytes | None = None) -> StoreEntry | None:
        """The entry a sidecar describes (its bytes ``raw`` when given), or None when absent or invalid."""
        path = folder / f"{doc}.json"
        try:
            body = json.loads(path.read_bytes() if raw is None else raw)
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
                ("fingerprint", _fp_dirname(entry.key.fingerprint) != folder.name),
                ("block_tokens", body["block_tokens"] != self.block_tokens),
                ("num_tokens", entry.num_tokens < 1),
                ("dtype", entry.dtype not in DTYPES),
                ("block_hashes", len(body["block_hashes"]) != 64 * (entry.num_tokens // self.block_tokens)),
            ) if bad]
        except FileNotFoundError:
            return None  # removed between the listing and the read
        except (ValueError, KeyError, TypeError) as exc:
            problems = [f"unreadable ({exc})"]
        if problems:
            self._counters.corrupt += 1
            warnings.warn(f"kvfast store: {path}: sidecar is invalid ({', '.join(problems)}); skipped (kvfast store "
                          "gc removes it)", RuntimeWarning, stacklevel=3)
            return None
        return entry

    def _sidecar(self, key: StoreKey, reader: KvfReader, file_bytes: int, provenance: str,
                 signature: dict[str, Any] | None) -> bytes:
        m = reader.manifest
        body = {
            "store_version": STORE_VERSION, "fingerprint": key.fingerprint, "document_key": key.document,
            "num_tokens": m.num_tokens, "block_tokens": self.block_tokens, "token_sha256": m.token_sha256,
            "kv": {"num_layers": m.num_layers, "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                   "dtype": DTYPE_NAMES[m.dtype]},
            "kv_bytes": sum(c.raw_length for c in reader.chunks), "file_bytes": file_bytes, "created": time.time(),
            "block_hashes": "".join(self._block_hashes(reader.token_ids)),
            "provenance": provenance,
        }
        if signature is not None:  # the publisher's sidecar and what ingest verified, for audits and re-export
            body["signature"] = signature
        return json.dumps(body, sort_keys=True).encode()

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
        key = StoreKey(fingerprint, self._document_key(token_ids))
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self._tmp_path(".kvf")
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
        ids = torch.from_numpy(_token_array(token_ids))
        key = StoreKey(model_fingerprint(model), self._document_key(ids))
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self._tmp_path(".kvf")
        try:
            hf_publish(model, ids, tmp, **publish_options)
            return self._commit(key, tmp, PREFILL_PROVENANCE, None)
        finally:
            tmp.unlink(missing_ok=True)

    def _put_file(self, src: Path, verify: bool, signature: str | os.PathLike | None) -> StoreEntry:
        with open_kvf(src) as r:  # cheap: validates header and tokens, finds the key before any copy
            key = StoreKey(r.manifest.fingerprint, self._document_key(r.token_ids))
        if (existing := self._existing(key)) is not None:
            return existing
        tmp = self._tmp_path(".kvf")
        try:
            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
            # Check the bytes that will be committed, not the source (it may change under us).
            try:
                with open_kvf(tmp) as r:
                    if verify:
                        r.verify()
                    copied = StoreKey(r.manifest.fingerprint, self._document_key(r.token_ids))
            except FormatError as exc:  # name the caller's file, not the store's private copy of it
                detail = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
                raise type(exc)(f"{detail}; not stored", path=src) from None
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

    def _existing(self, key: StoreKey) -> StoreEntry | None:
        with self._mutex:
            entry = self._index_of(key.fingerprint).entries.get(key.document)
            if entry is not None and entry.path.exists():
                self._counters.duplicate_puts += 1
                return entry
        return None

    def _commit(self, key: StoreKey, tmp: Path, provenance: str, signature: dict[str, Any] | None) -> StoreEntry:
        """Move a complete, fsynced .kvf into place and write its sidecar: the two renames of a publish."""
        _failpoint("put:written")
        kvf, side = self._paths(key)
        with open_kvf(tmp) as r:
            sidecar = self._sidecar(key, r, tmp.stat().st_size, provenance, signature)
        side_tmp = self._tmp_path(".json")
        try:
            _write_durable(side_tmp, sidecar)
            _failpoint("put:sidecar-written")
            if not kvf.parent.exists():
                kvf.parent.mkdir(exist_ok=True)
                _fsync_dir(self._data)
            # Never take self._mutex while holding a file lock (attach holds the mutex and may remove).
            with self._key_lock(key):
                duplicate = side.exists() and kvf.exists()  # another process published it first
                if not duplicate:
                    os.replace(tmp, kvf)
                    _fsync_dir(kvf.parent)
                    _failpoint("put:kvf-renamed")
                    os.replace(side_tmp, side)  # the commit point
                    _fsync_dir(kvf.parent)
                    _failpoint("put:committed")
        finally:
            side_tmp.unlink(missing_ok=True)
        with self._mutex:
            if duplicate:
                self._counters.duplicate_puts += 1
            else:
                self._counters.puts += 1
        # Another process may already have removed it again: that is a later state, not an error.
        entry = self._read_sidecar(side.parent, key.document) or self._read_sidecar(side.parent, key.document, sidecar)
        with self._mutex:
            self._index_of(key.fingerprint)  # the folder changed: the rescan picks the entry up
        self._enforce_disk_budget(protect={key})
        return entry

    # -- lookup ----------------------------------------------------------------------------------------------
    def get(self, key: StoreKey | tuple[str, str]) -> StoreEntry | None:
        """The entry stored under ``key`` = (fingerprint, document key), or None.

        Example:
            >>> store.get((kvfast.fingerprint(model), kvfast.document_key(doc_ids)))  # doctest: +SKIP
        """
        key = StoreKey(*key)
        with self._mutex:
            return self._index_of(key.fingerprint).entries.get(key.document)

    def list(self, fingerprint: str | None = None) -> list[StoreEntry]:  # noqa: A003 - the store's listing
        """Every stored entry (of one model when ``fingerprint`` is given), sorted by key."""
        with self._mutex:
            if fingerprint is not None:
                dirs = [_fp_dirname(fingerprint)]
            else:
                dirs = [d.name for d in self._data.iterdir() if d.is_dir() and not d.name.startswith(".")]
            out = [e for d in dirs for e in self._dir_index(d).entries.values()]
        return sorted(out, key=lambda e: e.key)

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
            return self._match(self._fingerprint(model), _token_array(prompt_token_ids), None)

    def _fingerprint(self, model: Any) -> str:
        return model if isinstance(model, str) else model_fingerprint(model)

    def _match(self, fp: str, ids: np.ndarray, cache: PagedKVCache | None) -> StoreMatch | None:
        idx = self._index_of(fp)
        if not idx.entries:
            return None
        chain = self._block_hashes(ids)
        matched = 0  # stored chains are prefix-closed, so the first miss ends the walk
        while matched < len(chain) and chain[matched] in idx.by_hash:
            matched += 1
        tail = chain[matched - 1] if matched else ""
        # A document whose full blocks are exactly the matched ones, followed by a partial block, matches
        # whole when the prompt goes on with that partial block: the document key proves it.
        candidates = []
        for doc in idx.by_tail.get(tail, ()):
            e = idx.entries[doc]
            if e.num_tokens <= len(ids) and self._document_key(ids[: e.num_tokens]) == doc:
                candidates.append((e.num_tokens, e))
        if not candidates and matched:
            candidates = [(matched * self.block_tokens, idx.entries[doc]) for doc in idx.by_hash[tail]]
        if not candidates:
            return None
        tier = self._device.get(cache) if cache is not None else None

        def rank(c: tuple[int, StoreEntry]) -> tuple:
            n, e = c
            return (n, tier is not None and e.key in tier.roots, e.key in self._ram, self._last_used.get(e.key, 0.0),
                    e.key.document)

        n, entry = max(candidates, key=rank)
        return StoreMatch(entry, n)

    # -- attach ----------------------------------------------------------------------------------------------
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
        ids = _token_array(prompt_token_ids)
        fp = self._fingerprint(model)
        started = time.perf_counter()
        with self._mutex:
            self._counters.attaches += 1
            for _ in range(3):  # another process may remove the matched entry under us: match again
                m = self._match(fp, ids, cache)
                n = 0 if m is None else min(m.num_tokens, len(ids) - min_rest)
                if n <= 0:
                    break
                self._check_fits(m.entry, cache, model)
                if not self._trusts(m.entry):
                    raise SignatureError(f"entry is {m.entry.provenance}, not signed by a trusted key; put it "
                                         "again with its signature", path=m.entry.path)
                try:
                    root, tier = self._resident(m.entry, cache, verify)
                except FileNotFoundError:
                    self._forget(m.entry.key)
                    continue
                except FormatError as exc:
                    self._set_aside(m.entry, exc)
                    continue
                if not np.array_equal(root.token_ids[:n], ids[:n]):
                    raise TokenMismatchError(f"stored token ids differ from the prompt's first {n}; the entry "
                                             "is inconsistent: remove it and publish again", path=m.entry.path)
                seq = cache.fork(root.seq, n)
                if m.entry.key not in self._device[cache].roots:  # loaded over budget: the caller owns it alone
                    cache.free(root.seq)
                self._served(m.entry, tier, n, model)
                if self.ledger is not None:
                    try:  # a load that cannot be billed is not served
                        self.ledger.append(tenant=self.tenant_id, fingerprint=m.entry.key.fingerprint,
                                           document=m.entry.key.document, tokens=n,
                                           nbytes=n * m.entry.bytes_per_token, tier=tier,
                                           seconds=time.perf_counter() - started, time_s=time.time())
                    except BaseException:
                        cache.free(seq)
                        raise
                return seq, n
            self._counters.misses += 1
            return cache.new_sequence(), 0

    def _check_fits(self, entry: StoreEntry, cache: PagedKVCache, model: Any) -> None:
        theirs = (entry.num_layers, entry.num_kv_heads, entry.head_dim)
        ours = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
        if theirs != ours:
            raise ShapeMismatchError(f"stored KV has (layers, kv_heads, head_dim) = {theirs}, the paged cache "
                                     f"{ours}", path=entry.path)
        dtype = DTYPES[entry.dtype]
        for what, other in (("paged cache", cache.dtype), ("model", getattr(model, "dtype", dtype))):
            if other != dtype:
                raise DtypeMismatchError(f"stored KV is {entry.dtype} but the {what} is {other}", path=entry.path)

    def _served(self, entry: StoreEntry, tier: str, n: int, model: Any) -> None:
        c = self._counters
        c.loads_served += 1
        c.hits[tier] += 1
        c.tokens_reused += n
        if tier == "device":
            c.bytes_read["device"] += n * entry.bytes_per_token
        if not isinstance(model, str):
            if model not in self._num_params:
                self._num_params[model] = sum(p.numel() for p in model.parameters())
            c.prefill_flops_saved += 2.0 * self._num_params[model] * n
        now = time.monotonic()
        self._last_used[entry.key] = now
        if now - self._last_touched.get(entry.key, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
            self._last_touched[entry.key] = now
            with contextlib.suppress(OSError):
                os.utime(entry.path)  # the disk tier's last-use time, seen by every process

    # -- tiers -----------------------------------------------------------------------------------------------
    def _resident(self, entry: StoreEntry, cache: PagedKVCache, verify: bool) -> tuple[_Root, str]:
        """The document's root in ``cache``, made resident from RAM or disk when needed (LRU-touched)."""
        tier = self._device.setdefault(cache, _DeviceTier())
        key = entry.key
        if key in tier.roots:
            tier.roots.move_to_end(key)
            return tier.roots[key], "device"
        # The RAM tier is inclusive: a document's bytes never change, so its host copy stays valid while it
        # is resident, and a later eviction from the cache costs no copy (held here even if the RAM tier
        # drops it while room is made below).
        ram = self._ram.get(key)
        if ram is not None:
            self._ram.move_to_end(key)
        self._make_room(cache, tier, cache.blocks_for(entry.num_tokens))
        if ram is not None:
            seq = self._load_from_ram(ram, cache)
            root, source = _Root(seq, ram.token_ids, entry.num_tokens, entry.kv_bytes), "ram"
        else:
            with open_kvf(entry.path) as reader:
                if reader.manifest.fingerprint != key.fingerprint:
                    raise FormatError("file's fingerprint differs from its store entry", path=entry.path)
                seq = load(reader, cache, fingerprint=key.fingerprint, verify=verify)
                root = _Root(seq, reader.token_ids.numpy(), entry.num_tokens, entry.kv_bytes)
            source = "disk"
        self._counters.bytes_read[source] += root.nbytes
        if self.device_budget is None or tier.blocks + len(seq.block_table) <= self.device_budget:
            tier.roots[key] = root
            tier.blocks += len(seq.block_table)
        return root, source

    def _in_use(self, cache: PagedKVCache, root: _Root) -> bool:
        """Whether any agent still shares the root's blocks (they have a reference count above 1)."""
        return bool((cache.allocator.refcount[root.seq.block_table] > 1).any())

    def _make_room(self, cache: PagedKVCache, tier: _DeviceTier, need: int) -> None:
        """Evict unused roots, least recently used first, until ``need`` blocks fit the budget and the cache."""
        for key in list(tier.roots):
            over_budget = self.device_budget is not None and tier.blocks + need > self.device_budget
            if not over_budget and cache.num_free_blocks >= need:
                return
            if not self._in_use(cache, tier.roots[key]):
                self._evict_root(cache, tier, key)

    def _evict_root(self, cache: PagedKVCache, tier: _DeviceTier, key: StoreKey) -> None:
        """Free a root's blocks; keep a host copy in the RAM tier (if it has none yet) when it fits there."""
        root = tier.roots.pop(key)
        tier.blocks -= len(root.seq.block_table)
        blocks = root.seq.block_table
        page_shape = cache.storage.shape[3:]
        nbytes = cache.num_layers * 2 * len(blocks) * math.prod(page_shape) * cache.storage.element_size()
        if key in self._ram:
            self._ram.move_to_end(key)
        elif nbytes <= self.ram_budget:
            pages = torch.empty(cache.num_layers, 2, len(blocks), *page_shape, dtype=cache.dtype,
                                pin_memory=torch.cuda.is_available())
            index = torch.tensor(blocks, dtype=torch.long, device=cache.device)
            for layer in range(cache.num_layers):  # one layer at a time bounds the device-side temporary
                pages[layer].copy_(cache.storage[layer].index_select(1, index))
            self._ram_put(key, _RamEntry(pages, cache.layout, root.num_tokens, root.token_ids))
        cache.free(root.seq)
        self._counters.evictions["device"] += 1

    def _ram_put(self, key: StoreKey, ram: _RamEntry) -> None:
        if ram.nbytes > self.ram_budget:
            return
        while self._ram_used + ram.nbytes > self.ram_budget:
            _, old = self._ram.popitem(last=False)
            self._ram_used -= old.nbytes
            self._counters.evictions["ram"] += 1
        self._ram[key] = ram
        self._ram_used += ram.nbytes

    def _load_from_ram(self, ram: _RamEntry, cache: PagedKVCache) -> KVSequence:
        seq = cache.new_sequence()
        slots = cache.append_slots(seq, ram.num_tokens)
        try:
            if (ram.layout, ram.block_size) == (cache.layout, cache.block_size):  # page for page: one copy
                index = torch.tensor(seq.block_table, dtype=torch.long, device=cache.device)
                for layer in range(cache.num_layers):
                    cache.storage[layer].index_copy_(1, index, ram.pages[layer].to(cache.device, non_blocking=True))
            else:  # evicted from a cache of another page shape: token by token
                for layer in range(cache.num_layers):
                    k, v = ram.tokens(layer)
                    cache.write(layer, slots, k.to(cache.device, non_blocking=True),
                                v.to(cache.device, non_blocking=True))
        except BaseException:
            cache.free(seq)
            raise
        return seq

    def evict(self, cache: PagedKVCache | None = None) -> int:
        """Free every resident document no agent shares (of ``cache``, or of all caches), keeping host copies
        in the RAM tier as its budget allows. Returns the number of blocks freed."""
        with self._mutex:
            freed = 0
            for c in ([cache] if cache is not None else list(self._device)):
                tier = self._device.get(c)
                for key in list(tier.roots) if tier else []:
                    if not self._in_use(c, tier.roots[key]):
                        freed += len(tier.roots[key].seq.block_table)
                        self._evict_root(c, tier, key)
            return freed

    def close(self) -> None:
        """Drop every resident root and the RAM tier. Agents' sequences stay valid (they hold their blocks)."""
        with self._mutex:
            for cache, tier in list(self._device.items()):
                for root in tier.roots.values():
                    cache.free(root.seq)
                tier.roots.clear()
                tier.blocks = 0
            self._ram.clear()
            self._ram_used = 0

    # -- removal and garbage collection ----------------------------------------------------------------------
    def remove(self, key: StoreKey | tuple[str, str]) -> bool:
        """Delete an entry from disk and from every tier; returns whether it existed.

        Agents attached to it keep their sequences. The sidecar goes first (the entry disappears
        atomically), then the .kvf file.
        """
        key = StoreKey(*key)
        kvf, side = self._paths(key)
        with self._key_lock(key):
            existed = side.exists()
            side.unlink(missing_ok=True)
            _fsync_dir(side.parent)
            _failpoint("remove:uncommitted")
            kvf.unlink(missing_ok=True)
        self._forget(key)
        return existed

    def _forget(self, key: StoreKey) -> None:
        with self._mutex:
            self._unindex(self._index_of(key.fingerprint), key.document)
            ram = self._ram.pop(key, None)
            if ram is not None:
                self._ram_used -= ram.nbytes
            for cache, tier in list(self._device.items()):
                root = tier.roots.pop(key, None)
                if root is not None:
                    tier.blocks -= len(root.seq.block_table)
                    cache.free(root.seq)

    def _set_aside(self, entry: StoreEntry, exc: Exception) -> None:
        warnings.warn(f"kvfast store: {entry.path}: {exc}; entry removed", RuntimeWarning, stacklevel=3)
        self._counters.corrupt += 1
        self.remove(entry.key)

    def _enforce_disk_budget(self, protect: set[StoreKey] = frozenset()) -> int:
        """Remove least recently used entries (by .kvf mtime) until the .kvf files fit ``disk_bytes``."""
        if self.disk_budget is None:
            return 0
        sized = []
        for e in self.list():
            with contextlib.suppress(FileNotFoundError):
                sized.append((e.path.stat().st_mtime_ns, e))
        total = sum(e.file_bytes for _, e in sized)
        removed = 0
        for _, e in sorted(sized, key=lambda t: t[0]):
            if total <= self.disk_budget:
                break
            if e.key in protect or self._pinned(e.key):
                continue
            if self.remove(e.key):
                removed += 1
                with self._mutex:
                    self._counters.evictions["disk"] += 1
            total -= e.file_bytes
        return removed

    def _pinned(self, key: StoreKey) -> bool:
        with self._mutex:
            return any(key in t.roots and self._in_use(c, t.roots[key]) for c, t in list(self._device.items()))

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
        report = dict.fromkeys(("temp_files", "orphans", "corrupt", "evicted"), 0)
        now = time.time()
        for p in self._tmp.iterdir():
            m = _TMP_RE.match(p.name)
            pid = int(m[1]) if m else None
            if pid == os.getpid():
                continue  # ours: another thread may be writing it
            with contextlib.suppress(FileNotFoundError):
                if pid is None or not _pid_alive(pid) or now - p.stat().st_mtime > _TMP_MAX_AGE_S:
                    p.unlink()
                    report["temp_files"] += 1
        for folder in [d for d in self._data.iterdir() if d.is_dir() and not d.name.startswith(".")]:
            for p in sorted(folder.iterdir()):
                doc, ext = p.stem, p.suffix
                if not _KEY_RE.fullmatch(doc) or ext not in (".kvf", ".json"):
                    continue
                kvf, side = folder / f"{doc}.kvf", folder / f"{doc}.json"
                if ext == ".kvf":
                    if side.exists():
                        continue
                    with self._flock(doc[:2]):  # a publisher holds this between its two renames
                        if kvf.exists() and not side.exists():
                            kvf.unlink()
                            report["orphans"] += 1
                    continue
                # Checking a file can take long: do it unlocked, then delete only if nothing changed since.
                seen = (_inode(side), _inode(kvf))
                if self._sound(folder, doc, verify):
                    continue
                with self._flock(doc[:2]):
                    if (_inode(side), _inode(kvf)) == seen and seen[0] is not None:
                        side.unlink()
                        kvf.unlink(missing_ok=True)
                        report["corrupt"] += 1
        report["evicted"] = self._enforce_disk_budget()
        entries = self.list()
        report["entries"] = len(entries)
        report["disk_bytes"] = sum(e.file_bytes for e in entries)
        return report

    def _sound(self, folder: Path, doc: str, verify: bool) -> bool:
        """Whether an entry's sidecar is valid and (with ``verify``) its file checks out in full."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry = self._read_sidecar(folder, doc)
        if entry is None:
            return not (folder / f"{doc}.json").exists()  # gone meanwhile: nothing to clean
        if not verify:
            return True
        try:
            with open_kvf(entry.path) as r:
                r.verify()
                return (r.manifest.fingerprint == entry.key.fingerprint
                        and self._document_key(r.token_ids) == doc)
        except FileNotFoundError:
            return not (folder / f"{doc}.json").exists()
        except FormatError:
            return False

    # -- metrics ---------------------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        """A snapshot of the tiers' sizes (disk: every process's entries) and this object's counters."""
        entries = self.list()
        with self._mutex:
            s = StoreStats(**{**asdict(self._counters)})
            s.entries, s.disk_bytes, s.disk_budget = len(entries), sum(e.file_bytes for e in entries), self.disk_budget
            s.ram_entries, s.ram_bytes, s.ram_budget = len(self._ram), self._ram_used, self.ram_budget
            s.device_budget = self.device_budget
            for tier in list(self._device.values()):
                s.device_documents += len(tier.roots)
                s.device_blocks += tier.blocks
                s.device_bytes += sum(r.nbytes for r in tier.roots.values())
            return s

    def device_blocks_used(self, cache: PagedKVCache) -> int:
        """Blocks of ``cache`` held by this store's resident documents (the device tier's usage)."""
        with self._mutex:
            tier = self._device.get(cache)
            return tier.blocks if tier is not None else 0
