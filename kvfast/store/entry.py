"""What a store holds and reports: keys, entries, matches, counters, and the grammar of names that reach paths."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kvfast.errors import InvalidArgumentError

TIERS = ("device", "ram", "disk")  # and "origin" in the counters of a store that has one
KEY_RE = re.compile(r"[0-9a-f]{64}")  # a document key or block hash: SHA-256, lowercase hex
TENANT_ID_RE = re.compile(r"[0-9a-f]{32}")  # Store.tenant_id: the first 16 bytes of an HMAC-SHA-256, hex
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")  # kvfast.fingerprint(model)


# -- identity ---------------------------------------------------------------------------------------------
class StoreKey(NamedTuple):
    """What a store entry is keyed by: the model that made the KV and the document it holds."""

    fingerprint: str  # kvfast.fingerprint(model)
    document: str  # kvfast.document_key(token_ids, block_tokens), 64 hex digits


# -- the grammar of names that reach paths ------------------------------------------------------------------
# Every name a store joins into a path is checked against its exact grammar before any file-system call: a key
# such as "../../<other tenant>/..." or "/etc/x" would otherwise name a file outside the entry's folder.
def _checked(value: Any, grammar: re.Pattern[str], what: str, spelling: str) -> str:
    if not isinstance(value, str) or not grammar.fullmatch(value):
        raise InvalidArgumentError(f"{what} must be {spelling}, got {value!r:.100}")
    return value


def check_document_key(value: Any) -> str:
    """``value`` if it is a document key (64 lowercase hex digits), else :class:`InvalidArgumentError`."""
    return _checked(value, KEY_RE, "a document key", "64 lowercase hex digits (kvfast.document_key)")


def check_fingerprint(value: Any) -> str:
    """``value`` if it is a model fingerprint (``sha256:`` and 64 lowercase hex digits), else
    :class:`InvalidArgumentError`."""
    return _checked(value, FINGERPRINT_RE, "a model fingerprint", "'sha256:' and 64 lowercase hex digits "
                    "(kvfast.fingerprint)")


def check_tenant_id(value: Any) -> str:
    """``value`` if it is a tenant id (32 lowercase hex digits, :attr:`Store.tenant_id`), else
    :class:`InvalidArgumentError`."""
    return _checked(value, TENANT_ID_RE, "a tenant id", "32 lowercase hex digits (Store.tenant_id)")


def check_key(key: Any) -> StoreKey:
    """``key`` as a :class:`StoreKey` whose fingerprint and document key both match their grammar.

    Raises:
        InvalidArgumentError: not a (fingerprint, document key) pair, or either part is malformed.
    """
    if not isinstance(key, tuple) or len(key) != 2:
        raise InvalidArgumentError(f"a store key is a (fingerprint, document key) pair, got {key!r:.100}")
    return StoreKey(check_fingerprint(key[0]), check_document_key(key[1]))


def fp_dirname(fp: str) -> str:
    """The folder of a fingerprint's entries: ``sha256:<64 hex>`` -> ``sha256-<64 hex>`` (checked first)."""
    return check_fingerprint(fp).replace(":", "-", 1)


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
            RAM, "disk" read from .kvf files; with an origin, also "origin": fetched into the disk tier first.
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
