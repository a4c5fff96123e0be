"""Usage ledger (kvfast.trust.ledger): every load recorded; deleting, editing or reordering any record is detected."""
from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

import kvfast
from kvfast.trust.ledger import GENESIS, Ledger, LedgerError, record_hash

FP = "sha256:" + "ab" * 32
LAYERS, HEADS, DIM = 2, 2, 8


def kv(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(tokens, HEADS, DIM, generator=g) for _ in range(LAYERS)],
            [torch.randn(tokens, HEADS, DIM, generator=g) for _ in range(LAYERS)])


def ids(tokens: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def cache(blocks: int = 64) -> kvfast.PagedKVCache:
    return kvfast.PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=blocks, block_size=16,
                               dtype=torch.float32)


def append(ledger: Ledger, i: int) -> dict:
    return ledger.append(tenant=f"t{i % 2}", fingerprint=FP, document=f"{i:064x}", tokens=100 + i, nbytes=1000 + i,
                         tier="disk", seconds=0.001, time_s=1.0e9 + i)


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    led = Ledger(tmp_path)
    for i in range(6):
        append(led, i)
    return led


def test_every_load_is_recorded(tmp_path):
    store = kvfast.Store(tmp_path / "s")
    docs = {seed: ids(40 + seed, seed) for seed in range(3)}
    for seed, doc in docs.items():
        store.put(kv(len(doc), seed), token_ids=doc, fingerprint=FP)
    c = cache()
    loads = []
    for seed in (0, 1, 0, 2, 2, 0):  # disk, then device hits
        seq, n = store.attach(FP, docs[seed] + [7], c)
        loads.append((seed, n))
        c.free(seq)
    store.attach(FP, ids(30, 99), c)  # a miss is no load: not recorded
    records = store.ledger.records()
    assert len(records) == len(loads)
    for r, (seed, n) in zip(records, loads):
        entry = store.match(FP, docs[seed]).entry
        assert (r["document"], r["fingerprint"], r["tokens"]) == (entry.key.document, FP, n)
        assert r["bytes"] == n * entry.bytes_per_token and r["tenant"] == "" and r["seconds"] >= 0
    assert [r["tier"] for r in records] == ["disk", "disk", "device", "disk", "device", "device"]
    report = store.ledger.verify()
    assert report.ok and report.records == len(loads) and report.totals[""]["loads"] == len(loads)


def test_chain_links_each_record_to_the_last(ledger):
    records = ledger.records()
    assert records[0]["prev"] == GENESIS and [r["seq"] for r in records] == list(range(6))
    for a, b in zip(records, records[1:]):
        assert b["prev"] == a["hash"] == record_hash(a)
    report = ledger.verify()
    assert report.ok and report.head == {"count": 6, "hash": records[-1]["hash"]}
    assert report.totals["t0"] == {"loads": 3, "tokens": 100 + 102 + 104, "bytes": 1000 + 1002 + 1004}


def _rewrite(ledger: Ledger, edit) -> None:
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    ledger.path.write_bytes(b"".join(edit(lines)))


def _edit_field(line: bytes) -> bytes:
    r = json.loads(line)
    r["tokens"] += 1
    return json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _edit_and_rehash(line: bytes) -> bytes:  # a forger who recomputes the edited record's own hash
    r = json.loads(line)
    r["bytes"] = 1
    r["hash"] = record_hash(r)
    return json.dumps(r, sort_keys=True, separators=(",", ":")).encode() + b"\n"


TAMPERING = {
    "delete first": lambda ls: ls[1:],
    "delete middle": lambda ls: ls[:2] + ls[3:],
    "delete last": lambda ls: ls[:-1],
    "delete all": lambda ls: [],
    "edit a field": lambda ls: ls[:3] + [_edit_field(ls[3])] + ls[4:],
    "edit and rehash": lambda ls: ls[:3] + [_edit_and_rehash(ls[3])] + ls[4:],
    "edit the last and rehash": lambda ls: ls[:-1] + [_edit_and_rehash(ls[-1])],
    "swap two": lambda ls: ls[:1] + [ls[2], ls[1]] + ls[3:],
    "reverse": lambda ls: ls[::-1],
    "duplicate one": lambda ls: ls[:3] + [ls[2]] + ls[3:],
    "truncate a record": lambda ls: ls[:-1] + [ls[-1][:20]],
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_detected(ledger, how):
    _rewrite(ledger, TAMPERING[how])
    report = ledger.verify()
    assert not report.ok and report.problems


def test_every_single_record_deleted_or_edited_is_detected(tmp_path):
    for i in range(8):
        for edit in (lambda ls, i=i: ls[:i] + ls[i + 1:], lambda ls, i=i: ls[:i] + [_edit_and_rehash(ls[i])] + ls[i + 1:]):
            led = Ledger(tmp_path / f"{i}-{len(list(tmp_path.iterdir()))}")
            for j in range(8):
                append(led, j)
            assert led.verify().ok
            _rewrite(led, edit)
            assert not led.verify().ok


def test_expect_head_detects_rewritten_history(ledger, tmp_path):
    head = ledger.verify().head["hash"]
    append(ledger, 6)
    assert ledger.verify(expect_head=head).ok
    other = Ledger(tmp_path / "other")  # a whole new history, head file and all
    for i in range(8):
        append(other, i + 100)
    ledger.path.write_bytes(other.path.read_bytes())
    ledger.head_path.write_bytes(other.head_path.read_bytes())
    assert ledger.verify().ok  # self-consistent...
    assert not ledger.verify(expect_head=head).ok  # ...but the head the publisher kept is gone


def test_append_refuses_to_bury_a_cut_record(ledger):
    """A torn line whose head was written was complete once: cutting it is tampering, never repaired."""
    ledger.path.write_bytes(ledger.path.read_bytes()[:-30])
    with pytest.raises(LedgerError, match="the head says 6 records, the complete ones are 5"):
        append(ledger, 6)


def _append_many(root: str, n: int) -> None:
    led = Ledger(root)
    for i in range(n):
        append(led, i)


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the ledger needs no torch: fork is safe and quick
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = Ledger(tmp_path).verify()
    assert report.ok and report.records == 150


def test_cli_store_ledger_verify(ledger, capsys):
    from kvfast.cli import main

    args = ["store", "ledger", str(ledger.root), "--verify"]
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 6
    _rewrite(ledger, TAMPERING["swap two"])
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "seq 2, expected 1" in out


def test_a_load_that_cannot_be_recorded_is_not_served(tmp_path):
    store = kvfast.Store(tmp_path / "s")
    doc = ids(40, 0)
    store.put(kv(40, 0), token_ids=doc, fingerprint=FP)
    c = cache()
    seq, _ = store.attach(FP, doc + [1], c)
    c.free(seq)
    with store.ledger.path.open("ab") as f:
        f.write(b'not a record\n')  # the chain cannot be extended
    free = c.num_free_blocks
    with pytest.raises(LedgerError, match="not JSON"):
        store.attach(FP, doc + [1], c)
    assert c.num_free_blocks == free  # the agent's fork was freed; only the store's resident root remains
