"""Loads under hostile conditions (issue 17): Ctrl-C in the middle of a native load, and many failed loads in a row.

Real processes and real signals: the interrupted loads run in a child interpreter that the test signals with
SIGINT, as a terminal's Ctrl-C would.
"""
from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast._backend import native
from kvfast.errors import ChecksumError
from tests.conftest import flip_bit

FP = "sha256:" + "ab" * 32
needs_native = pytest.mark.skipif(native is None, reason="needs the kvfast._C extension")


# -- point 11: a failed native load closes its file at once ------------------------------------------------
def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _mappings_of(path: Path) -> int:
    return Path("/proc/self/maps").read_text().count(str(path))


@needs_native
@pytest.mark.parametrize("method", ["preadv", "mmap"])
@pytest.mark.parametrize("blocking", [True, False])
def test_failed_native_loads_release_descriptor_and_mapping_without_gc(tmp_path, method, blocking):
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(64, 2, 8, generator=g).to(torch.bfloat16) for _ in range(2)]
    values = [torch.randn(64, 2, 8, generator=g).to(torch.bfloat16) for _ in range(2)]
    path = kvfast.save_kv(tmp_path / "doc.kvf", keys, values, range(64), fingerprint=FP, chunk_tokens=16)
    with kvfast.open(path) as reader:
        flip_bit(path, reader.chunks[-1].offset + 3)  # the last chunk: every other chunk lands first
    cache = kvfast.PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=8, block_size=16)
    gc.collect()
    gc.disable()  # what a process between collections sees: only reference counting frees
    try:
        fds, maps = _open_descriptors(), _mappings_of(path)
        for _ in range(50):
            with pytest.raises(ChecksumError):
                if blocking:
                    kvfast.load(path, cache, fingerprint=FP, backend="native", method=method)
                else:
                    kvfast.load_async(path, cache, fingerprint=FP, backend="native", method=method).wait()
        leaked_fds, leaked_maps = _open_descriptors() - fds, _mappings_of(path) - maps
    finally:
        gc.enable()
    assert (leaked_fds, leaked_maps) == (0, 0)
    assert cache.num_free_blocks == 8


# -- point 4: Ctrl-C during a native load ----------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, signal, sys, time, traceback
    import kvfast

    path, mode, fp = sys.argv[1], sys.argv[2], sys.argv[3]
    cache = kvfast.PagedKVCache(num_layers=4, num_kv_heads=8, head_dim=64, num_blocks=1024, block_size=16)
    total = cache.num_free_blocks
    counts = {"loads": 0, "completed": 0, "interrupted": 0, "inside_kvfast": 0, "late": 0, "leaked": 0}
    late = []
    record = lambda signum, frame: late.append(signum)  # a SIGINT after the load returned: not this test's case


    def load():
        if mode == "async":
            return kvfast.load_async(path, cache, fingerprint=fp, backend="native", threads=1).wait()
        return kvfast.load(path, cache, fingerprint=fp, backend="native", threads=1)


    signal.signal(signal.SIGINT, record)
    cache.free(load())  # warm the page cache
    times = []
    for _ in range(3):  # the time a warm, uninterrupted load takes
        t0 = time.perf_counter()
        cache.free(load())
        times.append(time.perf_counter() - t0)
    print(json.dumps({"full_load_s": min(times)}), flush=True)
    for line in sys.stdin:  # one line per load: the parent signals some time after it
        if line.strip() == "stop":
            break
        seq, raised_at = None, 0.0
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print("go", flush=True)
            seq = load()
        except KeyboardInterrupt as exc:
            counts["interrupted"] += 1
            if any("kvfast" in f.filename for f in traceback.extract_tb(exc.__traceback__)[1:]):
                counts["inside_kvfast"] += 1
                raised_at = time.monotonic()  # one clock for both processes
        finally:
            while True:  # a SIGINT just after the load returned raises here, in the handler swap: a late one
                try:
                    signal.signal(signal.SIGINT, record)
                    break
                except KeyboardInterrupt:
                    late.append(signal.SIGINT)
        counts["loads"] += 1
        if seq is not None:
            counts["completed"] += 1
            cache.free(seq)
        counts["leaked"] += total - cache.num_free_blocks
        if cache.num_free_blocks != total:  # count each leak once
            cache = kvfast.PagedKVCache(num_layers=4, num_kv_heads=8, head_dim=64, num_blocks=1024, block_size=16)
        print("done", raised_at, flush=True)
    counts["late"] = len(late)
    print(json.dumps(counts), flush=True)
""")


@needs_native
@pytest.mark.parametrize("mode", ["load", "async"])
def test_ctrl_c_during_a_native_load_frees_every_block_and_stops_it_early(tmp_path, mode):
    g = torch.Generator().manual_seed(1)
    tokens = 8192  # 4 layers x 8192 tokens x 8 heads x 64 x bf16: 64 MiB, tens of ms per load on one thread
    keys = [torch.randn(tokens, 8, 64, generator=g).to(torch.bfloat16) for _ in range(4)]
    path = kvfast.save_kv(tmp_path / "big.kvf", keys, keys, range(tokens), fingerprint=FP, chunk_tokens=256)
    del keys
    err = tmp_path / "child.err"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), mode, FP], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err.open("w"), text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        full = json.loads(child.stdout.readline())["full_load_s"]
        rng = random.Random(0)
        latencies = []  # SIGINT sent -> KeyboardInterrupt raised out of kvfast, in seconds
        for _ in range(40):
            child.stdin.write("load\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.0, full))  # mostly inside the load, some just after it
            sent = time.monotonic()
            child.send_signal(signal.SIGINT)
            done, raised_at = (child.stdout.readline().split() + ["", ""])[:2]
            assert done == "done", err.read_text()[-3000:]
            if float(raised_at):
                latencies.append(float(raised_at) - sent)
        child.stdin.write("stop\n")
        child.stdin.flush()
        counts = json.loads(child.stdout.readline())
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    print(counts, f"full load {full:.3f} s, Ctrl-C latency max {max(latencies, default=0):.3f} s")
    assert counts["loads"] == 40 and counts["inside_kvfast"] >= 10, counts  # the interrupts did hit loads
    assert counts["leaked"] == 0, counts
    # the load stops within a wait slice and the chunk each worker is on, not when it would have finished
    assert max(latencies) < 0.25, latencies


# -- point 1: a signed load returns only signed bytes, even while the file is rewritten under it -------------
def _same_crc_forgery(stored: bytes, change_at: int, fix_at: int) -> bytes:
    """``stored`` with byte ``change_at`` changed and the 4 bytes at ``fix_at`` chosen so that its CRC-32C stays
    the same: what anyone can do (CRC is linear over GF(2)), so the checksum is no defence; only the signature is."""
    from kvfast._backend import crc32c

    def linear(delta: bytes) -> int:  # crc(x ^ delta) == crc(x) ^ linear(delta) for messages of one length
        return crc32c(delta) ^ crc32c(bytes(len(delta)))

    def delta_at(offset: int, value: int, width: int) -> bytes:
        d = bytearray(len(stored))
        d[offset : offset + width] = value.to_bytes(width, "little")
        return bytes(d)

    target = linear(delta_at(change_at, 0x40, 1))
    # Solve sum(bit_i * linear(e_i)) == target over the 32 bits of the fix-up word (Gaussian elimination).
    rows = [(linear(delta_at(fix_at, 1 << i, 4)), 1 << i) for i in range(32)]
    basis: dict[int, tuple[int, int]] = {}
    for value, combo in rows:
        for bit in sorted(basis, reverse=True):
            if value >> bit & 1:
                value, combo = value ^ basis[bit][0], combo ^ basis[bit][1]
        if value:
            basis[value.bit_length() - 1] = (value, combo)
    value, combo = target, 0
    for bit in sorted(basis, reverse=True):
        if value >> bit & 1:
            value, combo = value ^ basis[bit][0], combo ^ basis[bit][1]
    assert value == 0, "the fix-up word spans every CRC value"
    forged = bytes(a ^ b ^ c for a, b, c in zip(stored, delta_at(change_at, 0x40, 1), delta_at(fix_at, combo, 4)))
    assert forged != stored and crc32c(forged) == crc32c(stored)
    return forged


FLIPPER = textwrap.dedent("""
    import os, sys
    path, offset, signed, forged = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
    fd = os.open(path, os.O_WRONLY)  # a process that may write the file but holds no key
    print("flipping", flush=True)
    while True:
        os.pwrite(fd, forged, offset)
        os.pwrite(fd, signed, offset)
""")


def test_signed_loads_never_return_forged_bytes_while_a_writer_flips_a_chunk(tmp_path):
    from kvfast.errors import FormatError, SignatureError
    from kvfast.trust.signing import keygen, sign

    g = torch.Generator().manual_seed(2)
    keys = [torch.randn(40, 2, 8, generator=g).to(torch.bfloat16) for _ in range(2)]
    values = [torch.randn(40, 2, 8, generator=g).to(torch.bfloat16) for _ in range(2)]
    path = kvfast.save_kv(tmp_path / "doc.kvf", keys, values, range(40), fingerprint=FP, chunk_tokens=16)
    private, public = keygen(tmp_path / "pub.key")
    sign(path, private)
    with kvfast.open(path) as reader:
        chunk = reader.chunks[0]  # layer 0, tokens 0:16; every load holds it whole
        signed = reader.read_stored(chunk).tobytes()
    forged = _same_crc_forgery(signed, change_at=1, fix_at=chunk.length - 4)  # K[0] changes; the fix-up in V
    cache = kvfast.PagedKVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=8, block_size=16)
    flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(path), str(chunk.offset), signed.hex(),
                                forged.hex()], stdout=subprocess.PIPE, text=True)
    outcomes: dict[str, int] = {}
    try:
        assert flipper.stdout.readline().strip() == "flipping"
        for i in range(400):
            backend = ("native", "python")[i % 2] if native is not None else "python"
            num_tokens = (None, 24)[i // 2 % 2]  # whole, and a prefix whose last chunk is only partly loaded
            try:
                seq = kvfast.load(path, cache, fingerprint=FP, trusted_keys=[public], backend=backend,
                                  num_tokens=num_tokens)
            except SignatureError:
                outcome = "refused: signature"
            except FormatError:  # the checksum of a read torn between the two versions
                outcome = "refused: checksum"
            else:
                k, _ = cache.gather(seq, 0)
                outcome = "signed bytes" if torch.equal(k[:16], keys[0][:16]) else "FORGED ACCEPTED"
                cache.free(seq)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        for i in range(30):  # Store.put verifies its own private copy: never the shared file twice
            store = kvfast.Store(tmp_path / f"store{i}", trusted_keys=[public])
            try:
                entry = store.put(path)
            except (SignatureError, FormatError):
                outcome = "store refused"
            else:
                with kvfast.open(entry.path) as stored:
                    ok = torch.equal(stored.read_layer(0, 0, 16)[0], keys[0][:16])
                outcome = "store: signed bytes" if ok else "STORE FORGED ACCEPTED"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    finally:
        flipper.kill()
        flipper.wait()
    print(outcomes)
    assert "FORGED ACCEPTED" not in outcomes and "STORE FORGED ACCEPTED" not in outcomes, outcomes
    assert outcomes.get("refused: signature", 0) > 0, outcomes  # the writer did get forged bytes into loads
    assert cache.num_free_blocks == 8  # refused loads gave their blocks back
