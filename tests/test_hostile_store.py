"""Hostile inputs and hostile neighbours on the store, trust and file-system side (issue 17, points 2, 5, 7, 8,
9, 12): names that try to leave their folder, files that are not files, symbolic links planted in the root, a
torn ledger, one tenant reading another's usage, and a size that went stale behind a long-lived store.

Every test uses real files, real FIFOs and symbolic links, real stores and processes; each fails on the code
before the fix, but for the linked-root test, which guards what already worked.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.cli import main as cli_main
from kvfast.errors import FileAccessError, InvalidArgumentError, LedgerError, SignatureError
from kvfast.trust.ledger import Ledger

FP = "sha256:" + "5a" * 32
LAYERS, HEADS, HEAD_DIM = 2, 2, 8
SALT_A, SALT_B = b"A" * 16 + b"tenant-a-secret", b"B" * 16 + b"tenant-b-secret"


def fake_kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(tokens, HEADS, HEAD_DIM, generator=g) for _ in range(LAYERS)],
            [torch.randn(tokens, HEADS, HEAD_DIM, generator=g) for _ in range(LAYERS)])


def doc_ids(tokens: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def put(store: kvfast.Store, seed: int, tokens: int = 40, **options) -> kvfast.StoreEntry:
    return store.put(fake_kv(tokens, seed), token_ids=doc_ids(tokens, seed), fingerprint=FP, **options)


def new_cache() -> kvfast.PagedKVCache:
    return kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=64, block_size=16, dtype=torch.float32)


def attach(store: kvfast.Store, seed: int, tokens: int = 40) -> int:
    cache = new_cache()
    seq, n = store.attach(FP, doc_ids(tokens, seed) + [1], cache)
    cache.free(seq)
    return n


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (symbolic links not followed), relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- 2: every name that reaches a path has its exact grammar --------------------------------------------------
def test_remove_cannot_leave_the_entrys_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("data.json", "data.kvf"):
        (outside / name).write_text("precious")
    store = kvfast.Store(tmp_path / "store")
    entry = put(store, 0)
    before = tree(tmp_path)
    for document in ("../../outside/data", str(outside / "data"), entry.key.document.upper(),
                     entry.key.document + "/", entry.key.document[:63], "", None):
        with pytest.raises(InvalidArgumentError, match="document key must be 64 lowercase hex digits"):
            store.remove((FP, document))
    for fingerprint in ("sha256:../../outside", "sha256:" + "5A" * 32, "md5:" + "5a" * 16, FP + "/x"):
        with pytest.raises(InvalidArgumentError, match="model fingerprint must be 'sha256:'"):
            store.remove((fingerprint, entry.key.document))
    assert tree(tmp_path) == before  # nothing deleted, not even a lock file created
    assert store.get(entry.key) == entry


def test_a_tenant_cannot_reach_another_tenants_entry(tmp_path):
    a, b = kvfast.Store(tmp_path, tenant=SALT_A), kvfast.Store(tmp_path, tenant=SALT_B)
    victim = put(b, 0)
    put(a, 1)  # A's model folder exists: the kernel resolves "<A's folder>/../../<B>/..." through it
    traversal = f"../../{b.tenant_id}/sha256-{'5a' * 32}/{victim.key.document}"
    for call in (lambda: a.remove((FP, traversal)), lambda: a.get((FP, traversal)),
                 lambda: a.load_into((FP, traversal), new_cache().pages, [0, 1, 2], doc_ids(40, 0))):
        with pytest.raises(InvalidArgumentError, match=r"document key .* got '\.\./\.\./"):
            call()
    assert victim.path.exists() and b.get(victim.key) == victim


@pytest.mark.parametrize("call", ["list", "match", "attach", "put"])
def test_every_store_method_checks_the_fingerprint(tmp_path, call):
    store = kvfast.Store(tmp_path / "store")
    bad = "sha256:../../../x"
    with pytest.raises(InvalidArgumentError, match=r"got 'sha256:\.\./\.\./\.\./x'"):
        {"list": lambda: store.list(bad), "match": lambda: store.match(bad, doc_ids(40, 0)),
         "attach": lambda: store.attach(bad, doc_ids(40, 0), new_cache()),
         "put": lambda: store.put(fake_kv(40, 0), token_ids=doc_ids(40, 0), fingerprint=bad)}[call]()
    assert tree(tmp_path / "store") == {".tmp", ".locks", "STORE.json", ".locks/root.lock"}


def test_a_file_whose_fingerprint_is_not_a_fingerprint_is_not_stored(tmp_path):
    path = kvfast.save_kv(tmp_path / "doc.kvf", *fake_kv(40, 0), doc_ids(40, 0), fingerprint="../../../etc")
    store = kvfast.Store(tmp_path / "store")
    with pytest.raises(kvfast.ManifestError, match=r"doc\.kvf: model\.fingerprint: .*'\.\./\.\./\.\./etc'"):
        store.put(path)
    assert store.list() == []


def test_grammar_checks_accept_exactly_their_grammar():
    from kvfast.store.entry import check_document_key, check_fingerprint, check_tenant_id

    assert check_document_key("0f" * 32) == "0f" * 32 and check_fingerprint(FP) == FP
    assert check_tenant_id("ab" * 16) == "ab" * 16
    for bad in ("0f" * 32 + "\n", "0f" * 31 + "0g", b"0f" * 32, 5):
        with pytest.raises(InvalidArgumentError):
            check_document_key(bad)
    for bad in ("../" + "ab" * 15, "AB" * 16, "ab" * 17):
        with pytest.raises(InvalidArgumentError, match="tenant id"):
            check_tenant_id(bad)


# -- 5: signature sidecars, keys and .kvf files must be regular files of a bounded size ----------------------
def finishes(call, fifo: Path | None = None, seconds: float = 10.0):
    """Run ``call`` in a thread; (True, its result or exception) if it finishes within ``seconds``, else
    (False, None) after unblocking it by opening ``fifo`` for writing (so a failing test does not hang)."""
    out: list = []

    def run():
        try:
            out.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader wakes up and sees end of file
        t.join(seconds)
        return False, None
    return not t.is_alive(), out[0] if out else None


@pytest.fixture
def signed(tmp_path):
    """A signed document and the publisher's key pair."""
    pytest.importorskip("cryptography")
    private, public = kvfast.keygen(tmp_path / "publisher.key")
    doc = kvfast.save_kv(tmp_path / "doc.kvf", *fake_kv(40, 0), doc_ids(40, 0), fingerprint=FP)
    kvfast.sign(doc, private)
    return doc, private, public


def signed_reads(doc: Path, public: Path, tmp_path: Path) -> dict:
    """Every path that reads ``doc``'s signature sidecar."""
    return {"verify_signature": lambda: kvfast.verify_signature(doc, [public]),
            "load": lambda: kvfast.load(doc, new_cache(), fingerprint=FP, trusted_keys=[public]),
            "Store.put": lambda: kvfast.Store(tmp_path / "store", trusted_keys=[public]).put(doc)}


@pytest.mark.parametrize("reader", ["verify_signature", "load", "Store.put"])
def test_a_fifo_as_signature_is_refused_at_once(signed, tmp_path, reader):
    doc, _, public = signed
    sig = Path(f"{doc}.sig")
    sig.unlink()
    os.mkfifo(sig)
    done, result = finishes(signed_reads(doc, public, tmp_path)[reader], fifo=sig)
    assert done, f"{reader} blocked on a FIFO"
    assert isinstance(result, SignatureError) and "not a regular file" in str(result) and str(sig) in str(result)


def test_an_oversized_signature_is_refused_unread(signed, tmp_path):
    from kvfast.trust.signing import MAX_SIDECAR_BYTES

    doc, _, public = signed
    sig = Path(f"{doc}.sig")
    with sig.open("r+b") as f:
        f.truncate(MAX_SIDECAR_BYTES + 1)  # sparse: costs no disk
    for reader, call in signed_reads(doc, public, tmp_path).items():
        with pytest.raises(SignatureError, match=f"{sig}: .*{MAX_SIDECAR_BYTES + 1} bytes or more, over the"):
            call()


# The process reads /dev/zero under an address-space limit 1 GiB above what it uses: before the fix it fills
# memory (MemoryError), after it the sidecar is refused by type before a byte is read.
DEV_ZERO_SIDECAR = """
import resource, sys
from kvfast.trust.signing import read_sidecar
from kvfast.errors import SignatureError
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    read_sidecar(sys.argv[1])
except SignatureError as exc:
    print("refused:", exc)
"""


def test_a_device_as_signature_is_refused_unread(tmp_path):
    pytest.importorskip("cryptography")
    sig = tmp_path / "doc.kvf.sig"
    sig.symlink_to("/dev/zero")
    proc = subprocess.run([sys.executable, "-c", DEV_ZERO_SIDECAR, str(sig)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"refused: {sig}: ") and "not a regular file" in proc.stdout


KEY_PATH_CASES = {"missing": "no such file", "folder": "is a folder", "fifo": "not a regular file",
                  "oversized": "bytes or more, over the"}


@pytest.mark.parametrize("case", list(KEY_PATH_CASES))
def test_a_key_path_that_is_not_a_key_file_raises_signature_error(signed, tmp_path, case):
    doc, _, _ = signed
    bad = tmp_path / "bad.pub"
    if case == "folder":
        bad.mkdir()
    elif case == "fifo":
        os.mkfifo(bad)
    elif case == "oversized":
        bad.write_bytes(b"\n" * (1 << 20))
    for load_key in (lambda: kvfast.verify_signature(doc, [bad]), lambda: kvfast.sign(doc, bad)):
        done, result = finishes(load_key, fifo=bad if case == "fifo" else None)
        assert done, "blocked on a FIFO key"
        assert isinstance(result, SignatureError) and str(bad) in str(result), repr(result)
        assert KEY_PATH_CASES[case] in str(result)


def test_loose_key_permissions_warn(signed):
    doc, private, public = signed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keygen's modes (0600, umask) are tight: no warning
        kvfast.verify_signature(doc, [public])
        kvfast.sign(doc, private)
    public.chmod(0o666)
    with pytest.warns(RuntimeWarning, match=f"{public}: the public key is writable by anyone"):
        kvfast.verify_signature(doc, [public])
    private.chmod(0o640)
    with pytest.warns(RuntimeWarning, match=f"{private}: the private key is readable by group or others"):
        kvfast.sign(doc, private)


def test_open_refuses_a_fifo_at_once(tmp_path):
    fifo = tmp_path / "doc.kvf"
    os.mkfifo(fifo)
    done, result = finishes(lambda: kvfast.open(fifo), fifo=fifo)
    assert done, "kvfast.open blocked on a FIFO"
    assert isinstance(result, FileAccessError) and f"{fifo}: is not a regular file" in str(result)


# -- 7: links and folders planted inside the root are never followed ------------------------------------------
def test_gc_skips_a_folder_in_tmp(tmp_path):
    store = kvfast.Store(tmp_path)
    (tmp_path / ".tmp" / "planted").mkdir()
    (tmp_path / ".tmp" / "dead-writer.kvf").write_bytes(b"x")
    assert store.gc()["temp_files"] == 1
    assert (tmp_path / ".tmp" / "planted").is_dir()


def test_gc_never_follows_a_linked_tmp(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    store = kvfast.Store(tmp_path / "store")
    (tmp_path / "store" / ".tmp").rmdir()
    (tmp_path / "store" / ".tmp").symlink_to(victim)
    with pytest.warns(RuntimeWarning, match=r"\.tmp is not a folder of the store"):
        assert store.gc()["temp_files"] == 0
    assert (victim / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileAccessError, match=r"\.tmp: is a symbolic link or a file"):
        kvfast.Store(tmp_path / "store")


def test_gc_never_follows_a_linked_model_folder(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    precious = victim / f"{'ab' * 32}.kvf"  # looks like an orphaned entry file
    precious.write_bytes(b"keep me")
    store = kvfast.Store(tmp_path / "store")
    put(store, 0)
    (tmp_path / "store" / f"sha256-{'cd' * 32}").symlink_to(victim)
    report = store.gc()
    assert precious.read_bytes() == b"keep me" and report["orphans"] == 0 and report["entries"] == 1
    with pytest.raises(FileAccessError, match="is a symbolic link or a file"):  # nor is anything put through it
        store.put(fake_kv(40, 1), token_ids=doc_ids(40, 1), fingerprint="sha256:" + "cd" * 32)
    assert store.list("sha256:" + "cd" * 32) == [] and sorted(p.name for p in victim.iterdir()) == [precious.name]


@pytest.mark.parametrize("name", ["LEDGER.head", "LEDGER.jsonl"])
def test_a_linked_ledger_file_is_never_written_through(tmp_path, name):
    target = tmp_path / "target"
    target.write_bytes(b"precious " * 32)
    store = kvfast.Store(tmp_path / "store")
    put(store, 0)
    (tmp_path / "store" / name).symlink_to(target)
    with pytest.raises(LedgerError, match=f"{name}: .*symbolic link"):
        attach(store, 0)
    assert target.read_bytes() == b"precious " * 32


def test_a_root_that_is_a_link_keeps_working(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = kvfast.Store(tmp_path / "link")
    entry = put(store, 0)
    assert attach(store, 0) == 40 and store.gc()["entries"] == 1 and store.ledger.verify().ok
    assert store.remove(entry.key) and store.list() == []


# -- 8: a torn ledger line is repaired by the next append, or by `kvfast store ledger ROOT --repair` ----------
def record_args(i: int) -> dict:
    return dict(tenant="", fingerprint=FP, document=f"{i:064x}", tokens=10 + i, nbytes=100 + i, tier="disk",
                seconds=0.001, time_s=1.0e9 + i)


def crashed_mid_append(root: Path, complete: int = 5, keep: int = 25) -> tuple[Ledger, bytes]:
    """A ledger as a crash during the append after ``complete`` records leaves it: the log ends with the first
    ``keep`` bytes of the next record, the head still names the last complete one. Returns it and the torn bytes."""
    led = Ledger(root)
    for i in range(complete):
        led.append(**record_args(i))
    head, size = led.head_path.read_bytes(), led.path.stat().st_size
    led.append(**record_args(complete))
    torn = led.path.read_bytes()[size: size + keep]
    with led.path.open("r+b") as f:
        f.truncate(size + keep)
    led.head_path.write_bytes(head)
    return led, torn


def _append_in_child(root: str, fsize_limit: int | None) -> None:
    import resource
    import signal

    if fsize_limit is not None:  # a full disk: writes past the limit are cut short, then fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
    try:
        Ledger(root).append(**record_args(99))
    except LedgerError:
        os._exit(3)
    os._exit(0)


def run_child(root: Path, fsize_limit: int | None = None) -> int:
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=_append_in_child, args=(str(root), fsize_limit))
    p.start()
    p.join(60)
    return p.exitcode


def test_the_next_append_repairs_a_torn_line_and_records_it(tmp_path):
    led, torn = crashed_mid_append(tmp_path)
    assert not led.verify().ok and "torn" in led.verify().problems[0]
    assert run_child(tmp_path) == 0  # another process appends: before the fix, every append failed from here on
    records = led.records()
    assert [r["tier"] for r in records] == ["disk"] * 5 + ["repair", "disk"]
    repair = records[5]
    assert repair["bytes"] == len(torn) and repair["document"] == hashlib.sha256(torn).hexdigest()
    report = led.verify()
    assert report.ok and report.records == 7 and report.totals[""]["loads"] == 6  # a repair is never billed


def test_a_full_disk_mid_append_leaves_the_ledger_as_it_was(tmp_path):
    led = Ledger(tmp_path)
    for i in range(5):
        led.append(**record_args(i))
    before = led.path.read_bytes()
    assert run_child(tmp_path, fsize_limit=len(before) + 40) == 3  # LedgerError, the record half written
    assert led.path.read_bytes() == before and led.verify().ok
    led.append(**record_args(5))
    assert led.verify().ok and led.verify().records == 6


def test_cli_repair_says_what_it_removed(tmp_path, capsys):
    led, torn = crashed_mid_append(tmp_path)
    assert cli_main(["store", "ledger", str(tmp_path), "--repair", "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"removed {len(torn)} bytes of a torn last record" in out and "recorded as record 5" in out
    assert "OK" in out and led.verify().ok
    assert cli_main(["store", "ledger", str(tmp_path), "--repair"]) == 0  # nothing left to repair
    assert "removed" not in capsys.readouterr().out


def test_repair_never_buries_tampering(tmp_path, capsys):
    led, _ = crashed_mid_append(tmp_path)
    lines = led.path.read_bytes().split(b"\n")
    record = json.loads(lines[2])
    record["tokens"] += 1000  # a complete record edited
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    led.path.write_bytes(b"\n".join(lines))
    assert cli_main(["store", "ledger", str(tmp_path), "--repair"]) == 1
    assert "not repaired" in capsys.readouterr().out
    with pytest.raises(LedgerError, match="do not verify .*hash mismatch"):
        led.append(**record_args(9))
    report = led.verify()
    assert not report.ok and "line 3 (seq 2): hash mismatch" in report.problems[0]


# -- 9: a tenant reads only its own usage records ---------------------------------------------------------------
def test_a_tenant_reads_only_its_own_ledger(tmp_path, capsys):
    a, b = kvfast.Store(tmp_path, tenant=SALT_A), kvfast.Store(tmp_path, tenant=SALT_B)
    secret = put(b, 1)
    put(a, 0)
    assert attach(a, 0) == 40 and attach(b, 1) == 40 and attach(b, 1) == 40
    mine = a.ledger.records()
    assert len(mine) == 1 and {r["tenant"] for r in mine} == {a.tenant_id}
    seen = json.dumps(mine)
    assert b.tenant_id not in seen and secret.key.document not in seen
    assert [r["tenant"] for r in b.ledger.records()] == [b.tenant_id] * 2
    assert cli_main(["store", "ledger", str(tmp_path), "--verify", "--json"]) == 0  # the operator sees both
    tenants = json.loads(capsys.readouterr().out)["tenants"]
    assert {t: (r["ok"], r["records"]) for t, r in tenants.items()} == {a.tenant_id: (True, 1), b.tenant_id: (True, 2)}
    assert cli_main(["store", "ledger", str(tmp_path), "--tenant", "../" + "ab" * 15]) == 2


# -- 12: a long-lived store sees an entry another process removed and put again ---------------------------------
REPUT = """
import sys, kvfast
from tests.test_hostile_store import put
store = kvfast.Store(sys.argv[1])
assert store.remove(store.list()[0].key)
print(put(store, 0, codec=sys.argv[2]).file_bytes)
"""


def test_a_long_lived_store_sees_a_replaced_entrys_size(tmp_path):
    store = kvfast.Store(tmp_path)
    entry = put(store, 0, codec="raw")
    assert store.stats().disk_bytes == entry.file_bytes == entry.path.stat().st_size
    proc = subprocess.run([sys.executable, "-c", REPUT, str(tmp_path), "expcode-v1"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    new_size = int(proc.stdout.split()[-1])
    assert new_size != entry.file_bytes and new_size == entry.path.stat().st_size
    assert store.stats().disk_bytes == new_size and store.get(entry.key).file_bytes == new_size
