"""Decompression bombs (issue 17 point 3): small coded files whose chunks claim huge decoded sizes.

Every reader path that does not need decoded bytes streams (verify, the signature digests, sign, Store.put);
a claim above the format's chunk limit is refused at open. Peak memory is measured in a fresh interpreter
from its kernel-kept high-water mark (``VmHWM``, reset before the operation: the import of torch peaks higher
than what follows, which would hide the operation's peak in ``ru_maxrss``).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.errors import LayoutError
MAX_CHUNK_BYTES = 256 << 20  # kvfast.format.spec.MAX_CHUNK_BYTES, spelled out: the spec fixes it
from tests.test_format import with_manifest, written

FP = "sha256:" + "ab" * 32
TOKENS, HEADS, DIM = 65536, 8, 64  # one chunk of zeros: 128 MiB decoded, about 1.3 MB coded
MIB = 1 << 20


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    zeros = [torch.zeros(TOKENS, HEADS, DIM, dtype=torch.bfloat16)]
    path = kvfast.save_kv(tmp_path_factory.mktemp("bomb") / "zeros.kvf", zeros, zeros, range(TOKENS),
                          fingerprint=FP, chunk_tokens=TOKENS, codec="lossless")
    assert path.stat().st_size < 2 * MIB
    return path


PEAK = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    import kvfast
    from kvfast.trust.signing import keygen, sign, verify_signature

    def kib(field):  # from /proc/self/status: VmRSS now, VmHWM the peak since the last reset
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

    def reset_peak():  # importing torch peaks higher than what follows: start the op's peak from its own RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return kib("VmRSS")

    def run(op, path, tmp):
        reader = kvfast.open(path)
        if op in ("verify_signature", "store_put_signed"):
            sign(path, private, output=tmp + "/doc.sig")
        before = reset_peak()
        if op == "verify":
            reader.verify()
        elif op == "sign":
            sign(path, private, output=tmp + "/doc.sig")
        elif op == "verify_signature":
            verify_signature(reader, [public], signature=tmp + "/doc.sig")
        elif op == "store_put":
            kvfast.Store(tmp + "/store").put(path)
        elif op == "store_put_signed":
            kvfast.Store(tmp + "/store", trusted_keys=[public]).put(path, signature=tmp + "/doc.sig")
        reader.close()
        return (kib("VmHWM") - before) / 1024

    bomb, op, tmp = sys.argv[1], sys.argv[2], sys.argv[3]
    private, public = keygen(tmp + "/k")
    os.makedirs(tmp + "/warm")
    small = kvfast.save_kv(tmp + "/warm/small.kvf", [torch.zeros(4, 1, 8)], [torch.zeros(4, 1, 8)], range(4),
                           fingerprint="sha256:" + "ab" * 32, codec="lossless")
    run(op, small, tmp + "/warm")  # lazy imports and first-use caches are not the operation's memory
    peak = run(op, bomb, tmp)
    print(json.dumps({"peak_mib": peak,
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


@pytest.mark.parametrize("op", ["verify", "sign", "verify_signature", "store_put", "store_put_signed"])
def test_reader_paths_that_need_no_decoding_stream_a_bomb_in_bounded_memory(bomb, tmp_path, op):
    out = subprocess.run([sys.executable, "-c", PEAK, str(bomb), op, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    peak = json.loads(out.stdout.splitlines()[-1])["peak_mib"]
    print(f"{op}: peak RSS +{peak:.1f} MiB over a 128 MiB decoded chunk")
    assert peak < 16, f"{op} raised the peak RSS by {peak:.1f} MiB"  # the chunk decodes to 128


def test_read_layer_decodes_one_chunk_at_a_time(bomb):
    with kvfast.open(bomb) as reader:
        k, v = reader.read_layer(0, 0, 16)
    assert not k.any() and not v.any()


def test_a_chunk_claiming_more_than_the_limit_is_refused_at_open(bomb, tmp_path):
    factor = 512  # head_dim 64 -> 32768: the one coded chunk now claims to decode to 64 GiB

    def grow(body):
        body["kv"]["head_dim"] *= factor
        body["chunks"] = [[o, n, raw * factor, crc] for o, n, raw, crc in body["chunks"]]

    path = written(tmp_path, with_manifest(bomb.read_bytes(), grow))
    with pytest.raises(LayoutError, match=f"over the {MAX_CHUNK_BYTES}-byte limit") as info:
        kvfast.open(path)
    assert str(path) in str(info.value)
