"""Keeping the root clean and within its disk budget: temp files of dead writers, orphaned .kvf files (a publish
cut short), invalid sidecars, corrupted files, and least recently used entries over ``disk_bytes``."""
from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kvfast._fs import is_real_dir, pid_alive
from kvfast.errors import FormatError
from kvfast.format import open_kvf
from kvfast.store.entry import KEY_RE, StoreKey

if TYPE_CHECKING:
    from kvfast.store.store import Store

_TMP_RE = re.compile(r"\.?(\d+)-")
_TMP_MAX_AGE_S = 24 * 3600  # a temp file this old is dead even if its pid was reused by a live process


def enforce_disk_budget(store: Store, protect: frozenset[StoreKey] = frozenset()) -> int:
    """Remove least recently used entries (by .kvf mtime) until the .kvf files fit ``store.disk_budget``; entries
    an agent shares in a cache, and ``protect``, stay. Returns how many were removed."""
    if store.disk_budget is None:
        return 0
    sized = sorted(store.disk.entries_by_age(), key=lambda t: t[0])
    total = sum(e.file_bytes for _, e in sized)
    removed = 0
    for _, e in sized:
        if total <= store.disk_budget:
            break
        if e.key in protect or store.in_use(e.key):
            continue
        if store.remove(e.key):
            removed += 1
            store.count_eviction("disk")
        total -= e.file_bytes
    return removed


def collect(store: Store, *, verify: bool = False) -> dict[str, int]:
    """:meth:`kvfast.Store.gc`: clean the root, then enforce the disk budget; returns the counts."""
    disk = store.disk
    report = dict.fromkeys(("temp_files", "orphans", "corrupt", "evicted"), 0)
    report["temp_files"] = _remove_dead_temp_files(disk.tmp)
    for folder in [disk.data / d for d in disk.index.dirnames()]:
        for p in sorted(folder.iterdir()):
            doc, ext = p.stem, p.suffix
            if not KEY_RE.fullmatch(doc) or ext not in (".kvf", ".json"):
                continue
            kvf, side = folder / f"{doc}.kvf", folder / f"{doc}.json"
            if ext == ".kvf":
                if side.exists():
                    continue
                with disk.flock(doc[:2]):  # a publisher holds this between its two renames
                    if kvf.exists() and not side.exists():
                        kvf.unlink()
                        report["orphans"] += 1
                continue
            # Checking a file can take long: do it unlocked, then delete only if nothing changed since.
            seen = (_inode(side), _inode(kvf))
            if _sound(store, folder, doc, verify):
                continue
            with disk.flock(doc[:2]):
                if (_inode(side), _inode(kvf)) == seen and seen[0] is not None:
                    side.unlink()
                    kvf.unlink(missing_ok=True)
                    report["corrupt"] += 1
    report["evicted"] = enforce_disk_budget(store)
    entries = store.list()
    report["entries"] = len(entries)
    report["disk_bytes"] = sum(e.file_bytes for e in entries)
    return report


def _remove_dead_temp_files(tmp: Path) -> int:
    """Remove the temp files of dead writers from ``tmp``; returns how many.

    Only what kvfast writes there is removed: files, and links themselves (an unlink never reaches a link's
    target). A folder is left alone, and a ``tmp`` that is itself a symbolic link is not entered (listing it would
    delete the files of the folder it points at).
    """
    if not is_real_dir(tmp):
        warnings.warn(f"kvfast store: {tmp} is not a folder of the store (a symbolic link?); its temp files are not "
                      "collected", RuntimeWarning, stacklevel=3)
        return 0
    removed, now = 0, time.time()
    with os.scandir(tmp) as it:
        for p in it:
            m = _TMP_RE.match(p.name)
            pid = int(m[1]) if m else None
            if pid == os.getpid() or p.is_dir(follow_symlinks=False):
                continue  # ours (another thread may be writing it), or a folder kvfast never makes
            with contextlib.suppress(FileNotFoundError):
                if pid is None or not pid_alive(pid) or now - p.stat(follow_symlinks=False).st_mtime > _TMP_MAX_AGE_S:
                    os.unlink(p.path)
                    removed += 1
    return removed


def _sound(store: Store, folder: Path, doc: str, verify: bool) -> bool:
    """Whether an entry's sidecar is valid and (with ``verify``) its file checks out in full."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        entry = store.disk.index.read_sidecar(folder, doc)
    if entry is None:
        return not (folder / f"{doc}.json").exists()  # gone meanwhile: nothing to clean
    if not verify:
        return True
    try:
        with open_kvf(entry.path) as r:
            r.verify()
            return r.manifest.fingerprint == entry.key.fingerprint and store.document_key(r.token_ids) == doc
    except FileNotFoundError:
        return not (folder / f"{doc}.json").exists()
    except FormatError:
        return False


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
