"""Usage ledger: an append-only, hash-chained log of every load a store serves, to verify and bill from.

One JSON object per line in ``ROOT/LEDGER.jsonl``:

    {"seq": 0, "time": 1764326400.12, "tenant": "", "fingerprint": "sha256:..", "document": "<64 hex>",
     "tokens": 4096, "bytes": 33554432, "tier": "disk", "seconds": 0.012, "prev": "000..0", "hash": "<64 hex>"}

``hash = SHA-256(prev || canonical JSON of the record without "hash")`` and ``prev`` is the previous record's
hash (64 zeros for the first), so editing, deleting or reordering any record breaks the chain at that point.
Deleting records at the end keeps a valid chain, so each append also rewrites ``ROOT/LEDGER.head`` (count and
last hash, one fixed-size ``pwrite`` in place, far cheaper than a rename): ``verify`` finds a
log shorter than its head. Someone who can rewrite both files can
rewrite history; a publisher who keeps the head ``verify`` printed (``expect_head``) detects that too.

Appends from many processes are serialised by ``fcntl.flock`` on ``ROOT/.locks/ledger.lock``; a record is one
``write`` of one line to a file opened ``O_APPEND``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfast.errors import LedgerError

LOG_NAME = "LEDGER.jsonl"
HEAD_NAME = "LEDGER.head"
GENESIS = "0" * 64
RECORD_FIELDS = ("seq", "time", "tenant", "fingerprint", "document", "tokens", "bytes", "tier", "seconds", "prev")
_TAIL_BYTES = 4096  # a record is far shorter: the last one is always within this many bytes of the end
_HEAD_BYTES = 128  # the head record, padded with spaces: one write within one disk sector


def record_hash(record: dict[str, Any]) -> str:
    """The chain hash of a record: ``SHA-256(prev || canonical JSON of every field but "hash")``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(record["prev"].encode() + data).hexdigest()


@dataclass
class LedgerReport:
    """What :func:`verify` found.

    Attributes:
        ok: the chain is intact and matches the head.
        records: records read.
        head: ``{"count", "hash"}`` after the last valid record (keep it: a later ``verify`` with
            ``expect_head`` proves nothing before it changed).
        problems: what is wrong, one line each, with the record number.
        totals: per tenant, ``{"loads", "tokens", "bytes"}`` over the valid records (what to bill).
    """

    ok: bool
    records: int
    head: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    totals: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "head": self.head, "problems": self.problems,
                "totals": self.totals}


class Ledger:
    """The usage ledger of one store root.

    Args:
        root: the store's folder (``LEDGER.jsonl`` and ``LEDGER.head`` live there).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path, self.head_path = self.root / LOG_NAME, self.root / HEAD_NAME
        self._lock_path = self.root / ".locks" / "ledger.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def append(self, *, tenant: str, fingerprint: str, document: str, tokens: int, nbytes: int, tier: str,
               seconds: float, time_s: float) -> dict[str, Any]:
        """Append one load's record (chained to the last record in the log) and return it."""
        with self._locked():
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                last = _last_record(fd, self.path)
                record = {"seq": 0 if last is None else last["seq"] + 1, "time": round(time_s, 6), "tenant": tenant,
                          "fingerprint": fingerprint, "document": document, "tokens": int(tokens),
                          "bytes": int(nbytes), "tier": tier, "seconds": round(seconds, 6),
                          "prev": GENESIS if last is None else last["hash"]}
                record["hash"] = record_hash(record)
                os.write(fd, json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            finally:
                os.close(fd)
            self._write_head(record["seq"] + 1, record["hash"])
        return record

    def _write_head(self, count: int, last_hash: str) -> None:
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, json.dumps({"count": count, "hash": last_hash}).encode().ljust(_HEAD_BYTES), 0)
        finally:
            os.close(fd)

    def records(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every record (of one tenant when given), as stored; does not check the chain (see :meth:`verify`)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if isinstance(r, dict) and (tenant is None or r.get("tenant") == tenant):
                    out.append(r)
        return out

    def verify(self, *, expect_head: str | None = None) -> LedgerReport:
        """Walk the chain: every line a record with the expected fields, ``seq`` counting from 0, ``prev`` the
        previous hash, ``hash`` recomputed; the last record equal to the head file (else records were deleted
        at the end); and ``expect_head`` (a hash an earlier verify printed), when given, among the hashes.

        Example:
            >>> kvfast.Ledger("/srv/kv").verify().ok  # doctest: +SKIP
            True
        """
        problems: list[str] = []
        totals: dict[str, dict[str, int]] = {}
        prev, count, hashes = GENESIS, 0, [GENESIS]
        with self._locked():  # a snapshot between appends: the log and its head agree
            lines = self.path.read_bytes().split(b"\n") if self.path.exists() else []
            head = self._read_head(problems)
        if lines and lines[-1] == b"":
            lines.pop()
        for i, line in enumerate(lines):
            try:
                r = json.loads(line)
                if not isinstance(r, dict) or set(r) != {*RECORD_FIELDS, "hash"}:
                    raise ValueError(f"fields {sorted(r) if isinstance(r, dict) else type(r).__name__}")
            except ValueError as exc:
                problems.append(f"line {i + 1}: not a ledger record ({exc})")
                break
            if r["seq"] != count:
                problems.append(f"line {i + 1}: seq {r['seq']}, expected {count} (a record was deleted or moved)")
                break
            if r["prev"] != prev:
                problems.append(f"line {i + 1} (seq {count}): prev does not match the previous record's hash "
                                "(a record before it was deleted, edited or moved)")
                break
            if record_hash(r) != r["hash"]:
                problems.append(f"line {i + 1} (seq {count}): hash mismatch (the record was edited)")
                break
            prev, count = r["hash"], count + 1
            hashes.append(prev)
            t = totals.setdefault(r["tenant"], {"loads": 0, "tokens": 0, "bytes": 0})
            t["loads"] += 1
            t["tokens"] += r["tokens"]
            t["bytes"] += r["bytes"]
        if head is not None and not problems:
            if head["count"] > count:
                problems.append(f"the head says {head['count']} records but the log has {count} (records were "
                                "deleted at the end)")
            elif hashes[head["count"]] != head["hash"]:
                problems.append(f"record {head['count'] - 1}'s hash differs from the head (the log was rewritten)")
            elif count - head["count"] > 1:  # one is a crash between an append and its head update
                problems.append(f"the log has {count} records but the head says {head['count']}")
        elif head is None and count and not problems:
            problems.append(f"{self.head_path} is missing but the log has {count} records")
        if expect_head is not None and expect_head not in hashes:
            problems.append(f"the expected head {expect_head[:16]}... is not in the chain (history was rewritten)")
        return LedgerReport(not problems, count, {"count": count, "hash": prev}, problems, totals)

    def _read_head(self, problems: list[str]) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_path.read_bytes())
            if not (isinstance(head, dict) and isinstance(head.get("count"), int)
                    and isinstance(head.get("hash"), str)):
                raise ValueError("needs an int 'count' and a str 'hash'")
            return head
        except FileNotFoundError:
            return None
        except ValueError as exc:
            problems.append(f"{self.head_path}: unreadable ({exc})")
            return None


def _last_record(fd: int, path: Path) -> dict[str, Any] | None:
    """The log's last record (read from its tail), or None for an empty log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
    if not tail.endswith(b"\n"):
        raise LedgerError("the last record is incomplete (a crash during an append?); run "
                          "`kvfast store ledger ROOT --verify`", path=path)
    try:
        return json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except ValueError:
        raise LedgerError("the last record is not JSON; run `kvfast store ledger ROOT --verify`", path=path) from None
