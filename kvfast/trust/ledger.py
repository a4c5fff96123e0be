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

A crash or a full disk during an append can leave a torn last line. The next append (or
``kvfast store ledger ROOT --repair``) verifies the chain of the complete records before it, cuts the torn tail
off and appends a ``"tier": "repair"`` record that holds the removed bytes' length and SHA-256: the repair is
itself in the chain. A chain broken before the tail is tampering, never repaired.

A tenant's store keeps its own ledger in its own folder (``ROOT/.tenants/<tenant_id>/LEDGER.jsonl``): a tenant
reads only its own records; the operator verifies each ledger.

The files are the ledger's own: symbolic links, FIFOs or folders planted under their names are refused
(``O_NOFOLLOW``, regular files only), never written through.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfast._fs import flock, open_regular, require_real_dir
from kvfast.errors import FileAccessError, LedgerError

LOG_NAME = "LEDGER.jsonl"
HEAD_NAME = "LEDGER.head"
GENESIS = "0" * 64
RECORD_FIELDS = ("seq", "time", "tenant", "fingerprint", "document", "tokens", "bytes", "tier", "seconds", "prev")
_TAIL_BYTES = 4096  # a record is far shorter: the last one is always within this many bytes of the end
_HEAD_BYTES = 128  # the head record, padded with spaces: one write within one disk sector
REPAIR_TIER = "repair"  # the record an append leaves where it cut off a torn tail (not a load: never billed)


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
    """The usage ledger of one store root, or of one tenant's folder in it.

    Args:
        root: the store's folder, or a tenant's (``ROOT/.tenants/<tenant_id>``): ``LEDGER.jsonl`` and
            ``LEDGER.head`` live there.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.path, self.head_path = self.root / LOG_NAME, self.root / HEAD_NAME

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        require_real_dir(self.root / ".locks")
        return flock(self.root / ".locks" / "ledger.lock")

    def _open(self, path: Path, flags: int) -> int:
        """``path`` opened for writing with ``flags``; a link, FIFO or folder there is a :class:`LedgerError`."""
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _ledger_error(exc, path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LedgerError("is not a regular file; the ledger writes only its own files", path=path)
        return fd

    def _read(self, path: Path) -> bytes | None:
        """The bytes of one of the ledger's files (None if absent), never through a link."""
        try:
            fd, st = open_regular(path, follow_symlinks=False)
        except FileAccessError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise LedgerError(exc.detail, path=path) from None
        try:
            return os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)

    def append(self, *, tenant: str, fingerprint: str, document: str, tokens: int, nbytes: int, tier: str,
               seconds: float, time_s: float) -> dict[str, Any]:
        """Append one load's record (chained to the last record in the log) and return it.

        A torn last line (a crash or a full disk during an earlier append) is cut off first, once the chain
        before it verifies (see :meth:`repair`).

        Raises:
            LedgerError: the log's last record is unreadable, the chain before a torn line is broken, a ledger
                file is a link or not a regular file, or the write failed (the log is then left as it was).
        """
        with self._locked():
            fd = self._open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                last = self._repair_locked(fd)["record"] if _torn(fd) else _last_record(fd, self.path)
                record = self._write_record(fd, last, tenant=tenant, fingerprint=fingerprint, document=document,
                                            tokens=tokens, nbytes=nbytes, tier=tier, seconds=seconds,
                                            time_s=time_s)
            finally:
                os.close(fd)
        return record

    def repair(self) -> dict[str, Any] | None:
        """Cut off a torn last line (left by a crash or a full disk during an append) and record that.

        The complete records before it are verified first; then the log is truncated after the last complete
        record and a ``"tier": "repair"`` record is appended (``bytes``: how many were removed, ``document``:
        their SHA-256), so the repair is part of the chain. Appends do this by themselves.

        Returns:
            None when the log ends with a complete record; else ``{"offset", "removed", "record"}``: where the
            torn tail began, its bytes, and the repair record.

        Raises:
            LedgerError: the complete records do not verify (tampering is reported, never repaired).

        Example:
            >>> kvfast.Ledger("/srv/kv").repair()  # doctest: +SKIP
            {'offset': 5120, 'removed': b'{"seq":12,"ti', 'record': {...}}
        """
        with self._locked():
            if self._read(self.path) is None:
                return None
            fd = self._open(self.path, os.O_RDWR | os.O_APPEND)
            try:
                return self._repair_locked(fd) if _torn(fd) else None
            finally:
                os.close(fd)

    def _repair_locked(self, fd: int) -> dict[str, Any]:
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        cut = data.rfind(b"\n") + 1
        walk = _walk(data[:cut].split(b"\n")[:-1])
        head = self._read_head(walk.problems)
        # A crash tears only a line whose head was never written; a head past the complete records means the
        # torn line was complete once: someone cut it (tampering), which a repair must not bury.
        if head is not None and not walk.problems and (head["count"] > walk.count
                                                       or walk.hashes[head["count"]] != head["hash"]):
            walk.problems.append(f"the head says {head['count']} records, the complete ones are {walk.count}")
        if walk.problems:
            raise LedgerError(f"the last line is torn, but the records before it do not verify ({walk.problems[0]}): "
                              "not repaired; run `kvfast store ledger ROOT --verify`", path=self.path)
        removed = data[cut:]
        os.ftruncate(fd, cut)
        os.fsync(fd)
        last = {"seq": walk.count - 1, "hash": walk.prev} if walk.count else None
        record = self._write_record(fd, last, tenant="", fingerprint="", document=hashlib.sha256(removed).hexdigest(),
                                    tokens=0, nbytes=len(removed), tier=REPAIR_TIER, seconds=0.0, time_s=time.time())
        return {"offset": cut, "removed": removed, "record": record}

    def _write_record(self, fd: int, last: dict[str, Any] | None, *, tenant: str, fingerprint: str, document: str,
                      tokens: int, nbytes: int, tier: str, seconds: float, time_s: float) -> dict[str, Any]:
        """Append the record after ``last`` as one line, then the head. A failed or short write is cut off
        again, so a full disk leaves the log as it was."""
        record = {"seq": 0 if last is None else last["seq"] + 1, "time": round(time_s, 6), "tenant": tenant,
                  "fingerprint": fingerprint, "document": document, "tokens": int(tokens), "bytes": int(nbytes),
                  "tier": tier, "seconds": round(seconds, 6), "prev": GENESIS if last is None else last["hash"]}
        record["hash"] = record_hash(record)
        line = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the torn line stays: the next append repairs it
            raise _ledger_error(exc, self.path) from None
        self._write_head(record["seq"] + 1, record["hash"])
        return record

    def _write_head(self, count: int, last_hash: str) -> None:
        fd = self._open(self.head_path, os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, json.dumps({"count": count, "hash": last_hash}).encode().ljust(_HEAD_BYTES), 0)
        finally:
            os.close(fd)

    def records(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Every record (of one tenant when given), as stored; does not check the chain (see :meth:`verify`)."""
        out = []
        for line in (self._read(self.path) or b"").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and (tenant is None or r.get("tenant") == tenant):
                out.append(r)
        return out

    def verify(self, *, expect_head: str | None = None) -> LedgerReport:
        """Walk the chain: every line a record with the expected fields, ``seq`` counting from 0, ``prev`` the
        previous hash, ``hash`` recomputed; the last record equal to the head file (else records were deleted
        at the end); and ``expect_head`` (a hash an earlier verify printed), when given, among the hashes.
        A torn last line (a crash during an append) is reported as such; :meth:`repair` removes it.

        Example:
            >>> kvfast.Ledger("/srv/kv").verify().ok  # doctest: +SKIP
            True
        """
        problems: list[str] = []
        with self._locked():  # a snapshot between appends: the log and its head agree
            data = self._read(self.path) or b""
            head = self._read_head(problems)
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the log ends with a complete line
        walk = _walk(lines)
        problems += walk.problems
        count, hashes = walk.count, walk.hashes
        if torn and not walk.problems:
            problems.append(f"line {len(lines) + 1}: torn ({len(torn)} bytes without a newline: a crash during an "
                            "append); the next append removes it, or `kvfast store ledger ROOT --repair`")
        if head is not None and not walk.problems:
            if head["count"] > count:
                problems.append(f"the head says {head['count']} records but the log has {count} (records were "
                                "deleted at the end)")
            elif hashes[head["count"]] != head["hash"]:
                problems.append(f"record {head['count'] - 1}'s hash differs from the head (the log was rewritten)")
            elif count - head["count"] > 1:  # one is a crash between an append and its head update
                problems.append(f"the log has {count} records but the head says {head['count']}")
        elif head is None and count and not walk.problems:
            problems.append(f"{self.head_path} is missing but the log has {count} records")
        if expect_head is not None and expect_head not in hashes:
            problems.append(f"the expected head {expect_head[:16]}... is not in the chain (history was rewritten)")
        return LedgerReport(not problems, count, {"count": count, "hash": walk.prev}, problems, walk.totals)

    def _read_head(self, problems: list[str]) -> dict[str, Any] | None:
        try:
            raw = self._read(self.head_path)
            if raw is None:
                return None
            head = json.loads(raw)
            if not (isinstance(head, dict) and isinstance(head.get("count"), int)
                    and isinstance(head.get("hash"), str)):
                raise ValueError("needs an int 'count' and a str 'hash'")
            return head
        except ValueError as exc:
            problems.append(f"{self.head_path}: unreadable ({exc})")
            return None


@dataclass
class _Walk:
    """What walking a chain of complete lines found: records that verify, up to the first problem."""

    count: int = 0
    prev: str = GENESIS
    hashes: list[str] = field(default_factory=lambda: [GENESIS])
    totals: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _walk(lines: list[bytes]) -> _Walk:
    """Verify the chain over ``lines`` (complete lines, no newlines); stops at the first problem."""
    w = _Walk()
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or set(r) != {*RECORD_FIELDS, "hash"}:
                raise ValueError(f"fields {sorted(r) if isinstance(r, dict) else type(r).__name__}")
        except ValueError as exc:
            w.problems.append(f"line {i + 1}: not a ledger record ({exc})")
            break
        if r["seq"] != w.count:
            w.problems.append(f"line {i + 1}: seq {r['seq']}, expected {w.count} (a record was deleted or moved)")
            break
        if r["prev"] != w.prev:
            w.problems.append(f"line {i + 1} (seq {w.count}): prev does not match the previous record's hash "
                              "(a record before it was deleted, edited or moved)")
            break
        if record_hash(r) != r["hash"]:
            w.problems.append(f"line {i + 1} (seq {w.count}): hash mismatch (the record was edited)")
            break
        w.prev, w.count = r["hash"], w.count + 1
        w.hashes.append(w.prev)
        if r["tier"] != REPAIR_TIER:
            t = w.totals.setdefault(r["tenant"], {"loads": 0, "tokens": 0, "bytes": 0})
            t["loads"] += 1
            t["tokens"] += r["tokens"]
            t["bytes"] += r["bytes"]
    return w


def _ledger_error(exc: OSError, path: Path) -> LedgerError:
    what = ("is a symbolic link, which the ledger never follows" if exc.errno == errno.ELOOP
            else exc.strerror or str(exc))
    return LedgerError(what, path=path)


def _torn(fd: int) -> bool:
    """Whether the log's last line lacks its newline (a crash or a full disk during an append)."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _last_record(fd: int, path: Path) -> dict[str, Any] | None:
    """The log's last record (read from its tail), or None for an empty log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
    try:
        return json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except ValueError:
        raise LedgerError("the last record is not JSON; run `kvfast store ledger ROOT --verify`", path=path) from None
