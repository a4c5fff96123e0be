"""The connector's background saver (kvfast.integrations.vllm.saver) on its own: vLLM's asynchronous-save protocol
(a request is reported finished sending once vLLM finished it and its save is over, once), failures counted and
reported, preempted requests' saves read their blocks before the step goes on, and a process killed mid-save
leaves no entry. The engine-level tests are in test_connector.py (engines G, H, I)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import kvfast
from kvfast.cache.pages import KVPages

FP = "sha256:" + "ef" * 32
LAYERS, BLOCKS, BLOCK, HEADS, DIM = 2, 8, 16, 2, 8


def vllm_cpu_pages(seed: int = 0) -> KVPages:
    """Pages in vLLM CPU's layout (K transposed inside a block), filled with random KV."""
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn(BLOCKS, HEADS, BLOCK, 2 * DIM, generator=g) for _ in range(LAYERS)]
    plane = [t.reshape(BLOCKS, HEADS, -1) for t in kv]
    keys = [p[..., : BLOCK * DIM].unflatten(-1, (DIM, BLOCK)).transpose(2, 3) for p in plane]
    values = [p[..., BLOCK * DIM :].unflatten(-1, (BLOCK, DIM)) for p in plane]
    return KVPages(keys, values, layout="HND")


def saver_for(tmp_path, pages: KVPages | None):
    from kvfast.integrations.vllm.saver import BackgroundSaver

    saver = BackgroundSaver(kvfast.Store(tmp_path / "store"))
    saver.pages = pages
    return saver


def settle(saver, finished: set[str]) -> set[str]:
    """vLLM says ``finished`` ended, then calls get_finished once a step: what was reported within 30 s."""
    reported = saver.finished(finished)
    deadline = time.monotonic() + 30
    while reported != finished and time.monotonic() < deadline:
        got = saver.finished(set())
        assert not got & reported, "a request was reported finished twice"
        reported |= got
        time.sleep(0.01)
    return reported


def test_a_save_is_reported_once_vllm_finished_the_request_and_the_save_is_over(tmp_path) -> None:
    pages = vllm_cpu_pages()
    saver = saver_for(tmp_path, pages)
    ids, blocks = list(range(3, 3 + 2 * BLOCK + 5)), [5, 1, 6]
    saver.submit("r1", ids, blocks, FP)
    saver._saves["r1"].done.result(timeout=30)  # noqa: SLF001 - the save is over, the request is not finished
    assert saver.finished(set()) == set()  # vLLM has not said r1 finished: its blocks stay held
    assert saver.finished({"r1", "other"}) == {"r1"}  # requests without a save are never reported
    assert saver.finished({"r1"}) == set() and saver.in_flight() == 0  # once only
    assert saver.outcomes() == {"r1": kvfast.document_key(ids)} and saver.outcomes() == {}
    entry = kvfast.Store(tmp_path / "store").get((FP, kvfast.document_key(ids)))
    with kvfast.open(entry.path) as r:
        for layer in range(LAYERS):
            k, v = r.read_layer(layer)
            gk, gv = pages.gather(layer, blocks, len(ids))
            assert torch.equal(k, gk) and torch.equal(v, gv)
    saver.close()


def test_a_request_that_finishes_before_its_save_is_reported_when_the_save_ends(tmp_path) -> None:
    saver = saver_for(tmp_path, vllm_cpu_pages())
    requests = {f"r{i}": list(range(i, i + BLOCK * 3)) for i in range(20)}
    for req_id, ids in requests.items():
        saver.submit(req_id, ids, [0, 1, 2], FP)
    assert settle(saver, set(requests)) == set(requests)  # finished at once, while most saves were still queued
    assert saver.in_flight() == 0 and saver.failures == 0
    assert len(kvfast.Store(tmp_path / "store").list(FP)) == len(requests)
    saver.close()


def test_a_failed_save_is_counted_reported_and_still_releases_its_blocks(tmp_path) -> None:
    saver = saver_for(tmp_path, None)  # vLLM's caches refused: nothing to read
    saver.refused = "unknown layout"
    saver.submit("r1", [1, 2, 3], [0], FP)
    assert settle(saver, {"r1"}) == {"r1"}
    assert saver.in_flight() == 0 and saver.failures == 1
    assert saver.outcomes() == {"r1": "failed: unknown layout"}
    assert kvfast.Store(tmp_path / "store").list() == []
    saver.close()


def test_preempted_requests_saves_read_their_blocks_before_the_step_goes_on(tmp_path) -> None:
    pages = vllm_cpu_pages()
    saver = saver_for(tmp_path, pages)
    ids = list(range(3, 3 + 4 * BLOCK))
    want = [pages.gather(layer, [0, 1, 2, 3], len(ids)) for layer in range(LAYERS)]
    saver.submit("r1", ids, [0, 1, 2, 3], FP)
    saver.wait_gathered({"r1", "never-saved"})
    for t in (*pages.keys, *pages.values):  # vLLM reuses the freed blocks
        t.zero_()
    assert settle(saver, {"r1"}) == {"r1"}
    entry = kvfast.Store(tmp_path / "store").get((FP, kvfast.document_key(ids)))
    with kvfast.open(entry.path) as r:
        for layer in range(LAYERS):
            k, v = r.read_layer(layer)
            assert torch.equal(k, want[layer][0]) and torch.equal(v, want[layer][1])
    saver.close()


KILLED = textwrap.dedent("""
    import sys, time, torch, kvfast
    from kvfast.cache.pages import KVPages
    from kvfast.integrations.vllm.saver import BackgroundSaver
    layers, blocks, block, heads, dim = 28, 33, 128, 8, 128  # a 4096-token prompt of a Qwen3-0.6B-sized model
    keys = [torch.ones(blocks, heads, block, dim, dtype=torch.bfloat16) for _ in range(layers)]
    saver = BackgroundSaver(kvfast.Store(sys.argv[1]))
    saver.pages = KVPages(keys, keys, layout="HND")
    saver.submit("r1", list(range(4096)), list(range(32)), "sha256:" + "ef" * 32)
    print("submitted", flush=True)
    time.sleep(600)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL of a child writing a file")
def test_a_save_killed_mid_write_leaves_no_entry(tmp_path) -> None:
    root = tmp_path / "store"
    kvfast.Store(root)
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the .kvf being written, past its first MiB
            if any(p.suffix == ".kvf" and p.stat().st_size > 1 << 20 for p in (root / ".tmp").iterdir()):
                break
            time.sleep(0.005)
        else:
            pytest.fail("the background save never started writing")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = kvfast.Store(root)
    assert store.list() == []
    assert all(".tmp" in p.parts for p in root.glob("**/*.kvf"))  # only the torn temporary file
    assert store.gc()["temp_files"] >= 1 and not any((root / ".tmp").iterdir())
