"""Mutation fuzzer over .kvf files (issue 17): mutated files through the reader and both loaders.

Each case mutates a valid seed file (raw and coded, two dtypes): bit flips, random bytes, truncation, appended
bytes, manifest fields set to hostile values (checksum and padding fixed up, so the mutation reaches the checks
after the manifest's CRC), and chunk bytes changed with their CRC fixed up (so coded payloads reach the
decoders). For every case:

- opening, ``verify``, ``read_layer`` and ``load`` (Python and native backends) either succeed or raise a
  kvfast error (:class:`KvfastError`); anything else (another exception type, a crash, a hang) is a bug;
- a load that succeeds holds exactly what ``read_layer`` reads, on both backends: no silent wrong data;
- a load that fails gives back every block it took.

A fast subset (``FAST_CASES``) runs in every test run; the full run is marked ``fuzz`` and deselected by default:
``python -m pytest -m fuzz tests/test_fuzz.py`` (``KVFAST_FUZZ_CASES`` sets its size). A hang dumps every
thread's stack and fails the run (faulthandler).
"""
from __future__ import annotations

import faulthandler
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast._backend import crc32c, native
from kvfast.errors import KvfastError
from kvfast.format.spec import PREAMBLE
from tests.test_format import manifest_bytes, with_manifest_bytes

FP = "sha256:" + "ab" * 32
FAST_CASES = 400
FULL_CASES = int(os.environ.get("KVFAST_FUZZ_CASES", "10000"))
CASE_TIMEOUT_S = 60  # one case takes milliseconds; this long means a hang
MAX_CACHE_BYTES = 16 << 20  # mutated shapes that would need a larger cache are checked up to the load only
INTERESTING = (0, 1, -1, 2, 3, 15, 16, 17, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63, 2**64, -(2**63), 10**30, 0.5, 1e308, "", "x", "raw", "expcode-v2", "bfloat16", None,
               True, [], {}, [0, 0, 0, 0])


def _seeds(folder: Path) -> list[bytes]:
    """Valid files: raw and coded, bf16 and fp16, a short last chunk, two layers."""
    out = []
    for i, (codec, dtype) in enumerate([("raw", torch.bfloat16), ("lossless", torch.bfloat16),
                                        ("raw", torch.float16), ("lossless", torch.float16)]):
        g = torch.Generator().manual_seed(i)
        keys = [(torch.randn(40, 2, 8, generator=g) * 4).to(dtype) for _ in range(2)]
        values = [(torch.randn(40, 2, 8, generator=g) * 4).to(dtype) for _ in range(2)]
        keys[0][5:20] = keys[0][4]  # repeated rows: expcode-v2's repeat path
        path = kvfast.save_kv(folder / f"seed{i}.kvf", keys, values, range(40), fingerprint=FP, chunk_tokens=16,
                              codec=codec, model_config={"architecture": "Fuzz"}, metadata={"seed": str(i)})
        out.append(path.read_bytes())
    return out


def _set_path(body: dict, rng: random.Random) -> str:
    """Set a random leaf of the manifest (or one element of a chunk entry) to a hostile value; returns its name."""
    node, name = body, ""
    while isinstance(node, dict) and node:
        key = rng.choice(sorted(node))
        name += "." + key
        if not isinstance(node[key], (dict, list)) or rng.random() < 0.3:
            node[key] = rng.choice(INTERESTING) if rng.random() < 0.7 else _nudge(node[key], rng)
            return name
        node = node[key]
    if isinstance(node, list) and node:
        i = rng.randrange(len(node))
        if isinstance(node[i], list) and node[i]:
            j = rng.randrange(len(node[i]))
            node[i][j] = _nudge(node[i][j], rng)
            return f"{name}[{i}][{j}]"
        node[i] = rng.choice(INTERESTING)
        return f"{name}[{i}]"
    return name


def _nudge(value, rng: random.Random):
    if isinstance(value, int) and not isinstance(value, bool):
        return value + rng.choice((-4097, -4096, -1, 1, 4096, value, -value))
    return rng.choice(INTERESTING)


def mutate(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutation of ``blob``: (kind, mutated bytes)."""
    kind = rng.choice(("bit", "byte", "span", "truncate", "append", "manifest", "manifest", "chunk", "chunk"))
    data = bytearray(blob)
    if kind == "bit":
        for _ in range(rng.choice((1, 1, 2, 8))):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    elif kind == "byte":
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == "span":
        at = rng.randrange(len(data))
        data[at : at + 8] = bytes([rng.choice((0, 0xFF, 0x7F, 0x80))]) * 8
    elif kind == "truncate":
        del data[rng.randrange(len(data)) :]
    elif kind == "append":
        data += os.urandom(rng.choice((1, 7, 4096)))
    elif kind == "manifest":
        body = json.loads(manifest_bytes(blob))
        kind += ":" + _set_path(body, rng)
        raw = json.dumps(body, separators=(",", ":")).encode()
        return kind, with_manifest_bytes(blob, raw)
    else:  # chunk bytes changed and their CRC fixed: the decoders see it
        body = json.loads(manifest_bytes(blob))
        i = rng.randrange(len(body["chunks"]))
        offset, length, _, _ = body["chunks"][i]
        start = _data_start(blob) + offset
        for _ in range(rng.choice((1, 2, 16))):
            data[start + rng.randrange(length)] = rng.randrange(256)
        body["chunks"][i][3] = crc32c(bytes(data[start : start + length]))
        return kind, with_manifest_bytes(bytes(data), json.dumps(body, separators=(",", ":")).encode())
    return kind, bytes(data)


def _data_start(blob: bytes) -> int:
    manifest_len = PREAMBLE.unpack(blob[: PREAMBLE.size])[2]
    return -(-(PREAMBLE.size + manifest_len) // 4096) * 4096


def check_case(path: Path) -> str:
    """Run one file through every path; returns the outcome, raises AssertionError on a bug."""
    try:
        reader = kvfast.open(path)
    except KvfastError:
        return "refused at open"
    with reader:
        m = reader.manifest
        try:
            reader.verify()
            layers = [reader.read_layer(layer) for layer in range(m.num_layers)]
        except KvfastError:
            layers = None
        cache_bytes = 2 * m.num_layers * -(-m.num_tokens // 16) * 16 * m.token_row_bytes
        if cache_bytes > MAX_CACHE_BYTES:
            return "opened, too large to load"
    backends = ("python", "native") if native is not None else ("python",)
    outcomes = set()
    for backend in backends:
        cache = kvfast.PagedKVCache(num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                                    num_blocks=-(-m.num_tokens // 16), block_size=16, dtype=m.dtype)
        try:
            seq = kvfast.load(path, cache, fingerprint=m.fingerprint, backend=backend)
        except KvfastError:
            assert cache.num_free_blocks == cache.num_blocks, f"{backend}: a failed load kept blocks"
            outcomes.add("refused at load")
            continue
        assert layers is not None, f"{backend} loaded a file that verify/read_layer refuse"
        for layer, (k, v) in enumerate(layers):
            got_k, got_v = cache.gather(seq, layer)
            assert torch.equal(got_k.view(torch.uint8), k.view(torch.uint8)) and \
                torch.equal(got_v.view(torch.uint8), v.view(torch.uint8)), \
                f"{backend}: layer {layer} differs from read_layer"
        outcomes.add("loaded")
    assert len(outcomes) == 1 or layers is None, f"the backends disagree: {outcomes}"
    if layers is not None and outcomes == {"refused at load"}:
        raise AssertionError("verify and read_layer accept a file that every load refuses")
    return outcomes.pop()


def fuzz(folder: Path, cases: int, seed: int) -> Counter:
    seeds = _seeds(folder)
    rng = random.Random(seed)
    found: Counter = Counter()
    path = folder / "case.kvf"
    for case in range(cases):
        kind, blob = mutate(rng.choice(seeds), rng)
        path.write_bytes(blob)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        try:
            outcome = check_case(path)
        except Exception as exc:  # noqa: BLE001 - reported with the case that produced it
            keep = folder / f"failing-{case}.kvf"
            keep.write_bytes(blob)
            raise AssertionError(f"case {case} ({kind}, kept as {keep}): {type(exc).__name__}: {exc}") from exc
        finally:
            faulthandler.cancel_dump_traceback_later()
        found[kind.split(":")[0] + " -> " + outcome] += 1
    return found


def test_fuzz_fast_subset(tmp_path):
    found = fuzz(tmp_path, FAST_CASES, seed=17)
    print(dict(found))
    assert sum(found.values()) == FAST_CASES
    outcomes = {k.split(" -> ")[1] for k in found}
    assert {"refused at open", "loaded"} <= outcomes, found  # mutations reach past the checks, too


@pytest.mark.fuzz
def test_fuzz_full(tmp_path):
    found = fuzz(tmp_path, FULL_CASES, seed=int(os.environ.get("KVFAST_FUZZ_SEED", "0")))
    print(dict(found))
    assert sum(found.values()) == FULL_CASES
