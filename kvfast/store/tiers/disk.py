"""The disk tier: the store's root folder, the source of truth. Nothing on disk is modified in place, so a crash
(or ``kill -9``) at any point leaves either the old state or the new one:

    ROOT/STORE.json                      store settings (block_tokens), written once
    ROOT/<fp>/<document_key>.kvf         the KV, an ordinary .kvf file (docs/FORMAT.md)
    ROOT/<fp>/<document_key>.json        sidecar: identity, shape, block hash chain. Its rename COMMITS the
                                         entry: no sidecar, no entry (an orphan .kvf is removed by gc)
    ROOT/.tmp/<pid>-<random>.*           files being written; gc removes those whose writer is dead
    ROOT/.locks/<xx>.lock                fcntl.flock stripes, by the document key's first two hex digits
    ROOT/.tenants/<tenant_id>/<fp>/...   a tenant's entries (Store(tenant=salt))

Locking: publishers write their file without any lock, then take the flock of the key's stripe only for the two
renames (and the duplicate check); ``remove`` and gc take the same lock, so a sidecar never points at a missing
file. Readers take no lock: they open files that are complete by construction.

Everything under the root is the store's own: a symbolic link planted as one of its folders is refused (a write
or a lock through it would land elsewhere) or skipped (gc never lists through it), and its files are read
without following links. The root itself may be a link: the operator chose it.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

from kvfast._fs import flock, fsync_dir, is_real_dir, read_small_file, require_real_dir, write_durable
from kvfast.errors import FileAccessError, FormatError
from kvfast.store.entry import StoreEntry, StoreKey
from kvfast.store.index import STORE_VERSION, DiskIndex

DEFAULT_BLOCK_TOKENS = 16  # tokens per hash-chain block: the granularity of prefix matches

# Test hook: called with a phase name at each step of a publish or remove (tests kill the process there).
_failpoint_hook: Callable[[str], None] | None = None


def _failpoint(name: str) -> None:
    if _failpoint_hook is not None:
        _failpoint_hook(name)


class DiskTier:
    """The root folder: settings, locks, temp files, and the two renames that commit an entry.

    Args:
        root: the store's folder (created if absent).
        data: where this store's fingerprint folders live (``root``, or a tenant's folder under it).
        block_tokens: as in :class:`kvfast.Store` (None: the root's, or 16 for a new root).
    """

    name = "disk"

    def __init__(self, root: Path, data: Path | None, block_tokens: int | None):
        self.root = root
        self.tmp, self.locks = root / ".tmp", root / ".locks"
        root.mkdir(parents=True, exist_ok=True)  # the root itself may be a symbolic link: the operator chose it
        for d in (self.tmp, self.locks):
            require_real_dir(d)
        self.block_tokens = self._settings(block_tokens)
        self.data = data if data is not None else root
        if data is not None:  # ROOT/.tenants/<id>
            require_real_dir(data.parent)
            require_real_dir(data)
        self.index = DiskIndex(self.data, self.block_tokens)

    # -- settings, locks, temp files ----------------------------------------------------------------------
    def _settings(self, block_tokens: int | None) -> int:
        path = self.root / "STORE.json"
        if not path.exists():
            with self.flock("root"):
                if not path.exists():
                    body = {"store_version": STORE_VERSION, "block_tokens": block_tokens or DEFAULT_BLOCK_TOKENS}
                    tmp = self.tmp_path(".json")
                    write_durable(tmp, json.dumps(body).encode())
                    os.replace(tmp, path)
                    fsync_dir(self.root)
        try:
            body = json.loads(read_small_file(path, 1 << 16, follow_symlinks=False)[0])
            version, stored = body["store_version"], body["block_tokens"]
        except (FileAccessError, ValueError, KeyError, TypeError) as exc:
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

    def flock(self, stripe: str) -> contextlib.AbstractContextManager[None]:
        """An exclusive lock shared by every process on this root, one per stripe."""
        return flock(self.locks / f"{stripe}.lock")

    def key_lock(self, key: StoreKey) -> contextlib.AbstractContextManager[None]:
        return self.flock(key.document[:2])

    def tmp_path(self, suffix: str) -> Path:
        return self.tmp / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    # -- the tier ---------------------------------------------------------------------------------------------
    def holds(self, key: StoreKey) -> bool:
        entry = self.index.get(key)
        return entry is not None and entry.path.exists()

    def used(self) -> int:
        return sum(e.file_bytes for e in self.index.entries())

    def commit(self, key: StoreKey, tmp: Path, sidecar: bytes) -> bool:
        """Move a complete, fsynced .kvf into place and write its sidecar: the two renames of a publish.

        Returns False when another process committed the same key first (``tmp`` is then left to the caller).
        """
        _failpoint("put:written")
        kvf, side = self.index.paths(key)
        side_tmp = self.tmp_path(".json")
        try:
            write_durable(side_tmp, sidecar)
            _failpoint("put:sidecar-written")
            if not is_real_dir(kvf.parent):
                require_real_dir(kvf.parent)  # creates it, or refuses a link planted as the model's folder
                fsync_dir(self.data)
            with self.key_lock(key):
                if side.exists() and kvf.exists():
                    return False
                os.replace(tmp, kvf)
                fsync_dir(kvf.parent)
                _failpoint("put:kvf-renamed")
                os.replace(side_tmp, side)  # the commit point
                fsync_dir(kvf.parent)
                _failpoint("put:committed")
            return True
        finally:
            side_tmp.unlink(missing_ok=True)

    def remove(self, key: StoreKey) -> bool:
        """Delete an entry: the sidecar first (the entry disappears atomically), then the .kvf file. Returns
        whether it existed."""
        kvf, side = self.index.paths(key)
        with self.key_lock(key):
            existed = side.exists()
            side.unlink(missing_ok=True)
            fsync_dir(side.parent)
            _failpoint("remove:uncommitted")
            kvf.unlink(missing_ok=True)
        self.index.forget(key)
        return existed

    forget = remove

    @staticmethod
    def touch(entry: StoreEntry) -> None:
        """Refresh the entry's last-use time (its .kvf mtime), which every process's budget eviction sees."""
        with contextlib.suppress(OSError):
            os.utime(entry.path)

    def entries_by_age(self) -> Iterator[tuple[int, StoreEntry]]:
        """(last use in ns, entry) of every entry still on disk."""
        for e in self.index.entries():
            with contextlib.suppress(FileNotFoundError):
                yield e.path.stat().st_mtime_ns, e
