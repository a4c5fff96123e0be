"""Signed artifacts (kvfast.trust.signing): honest files pass; every kind of change is refused, by a named error."""
from __future__ import annotations

import json
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.errors import FormatError, KvfastError
from kvfast.trust.signing import (
    SignatureError,
    digests,
    key_id,
    keygen,
    load_public_key,
    merkle_root,
    sig_path,
    sign,
    statement,
    verify_signature,
)

FP = "sha256:" + "ab" * 32
OTHER_FP = "sha256:" + "cd" * 32
LAYERS, TOKENS, HEADS, DIM, CHUNK = 2, 40, 2, 8, 16  # 3 chunks per layer, the last one short
FUZZ_CHANGES = 10_000


def kv(seed: int, tokens: int = TOKENS, layers: int = LAYERS, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(tokens, HEADS, DIM, generator=g).to(dtype) for _ in range(layers)]
    values = [torch.randn(tokens, HEADS, DIM, generator=g).to(dtype) for _ in range(layers)]
    return keys, values


def ids(seed: int, tokens: int = TOKENS) -> list[int]:
    return torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def save(path: Path, keys, values, token_ids, fingerprint: str = FP) -> Path:
    return kvfast.save_kv(path, keys, values, token_ids, fingerprint=fingerprint, chunk_tokens=CHUNK,
                          model_config={"architecture": "Test", "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    keygen(d / "pub.key")
    keygen(d / "other.key")
    return d


@pytest.fixture
def signed(tmp_path, keys_dir) -> Path:
    path = save(tmp_path / "doc.kvf", *kv(0), ids(0))
    sign(path, keys_dir / "pub.key")
    return path


def test_keygen_writes_private_0600_and_refuses_to_overwrite(tmp_path):
    private, public = keygen(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.name == "k.pub" and b"PUBLIC KEY" in public.read_bytes()
    assert key_id(load_public_key(public)) == key_id(load_public_key(private))
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "k")


def test_honest_artifacts_always_pass(tmp_path, keys_dir):
    trusted = [keys_dir / "pub.key.pub"]
    for seed in range(20):
        tokens = 1 + seed * 7  # 1..134 tokens: one short chunk up to several per layer
        path = save(tmp_path / f"d{seed}.kvf", *kv(seed, tokens, layers=1 + seed % 3), ids(seed, tokens))
        sign(path, keys_dir / "pub.key")
        v = verify_signature(path, trusted)
        assert v.key_id == key_id(load_public_key(trusted[0]))
        assert v.nbytes == path.stat().st_size


def test_sidecar_holds_statement_key_id_and_signature(signed, keys_dir):
    side = json.loads(sig_path(signed).read_text())
    assert set(side) == {"statement", "key_id", "signature"}
    st = side["statement"]
    with kvfast.open(signed) as r:
        assert st["tokens"]["sha256"] == r.manifest.token_sha256
        assert st["model"]["fingerprint"] == FP and st["codec"] == "raw" and st["kv"]["dtype"] == "bfloat16"
        assert st["model"]["config"]["rope_theta"] == 10000.0
        assert st["merkle_root"] == digests(r).merkle_root and st["num_chunks"] == len(r.chunks)
        assert st == statement(r)


def test_merkle_root_fixes_every_leaf_position():
    leaves = [bytes([i]) * 32 for i in range(7)]
    root = merkle_root(leaves)
    assert merkle_root(leaves[::-1]) != root
    assert merkle_root(leaves[:-1]) != root
    assert merkle_root(leaves + leaves[-1:]) != root  # no CVE-2012-2459-style duplicate of the last leaf
    assert merkle_root(leaves) == root


@pytest.mark.parametrize("case", ["unsigned", "untrusted key", "empty trust", "bad base64", "not json",
                                  "signature of other bytes"])
def test_refusals_are_named(signed, keys_dir, tmp_path, case):
    trusted = [keys_dir / "pub.key.pub"]
    side = sig_path(signed)
    body = json.loads(side.read_text())
    if case == "unsigned":
        side.unlink()
        match = "no signature"
    elif case == "untrusted key":
        trusted, match = [keys_dir / "other.key.pub"], "not among"
    elif case == "empty trust":
        with pytest.raises(ValueError, match="empty"):
            verify_signature(signed, [])
        return
    elif case == "bad base64":
        side.write_text(json.dumps({**body, "signature": "@@@"}))
        match = "not valid"
    elif case == "not json":
        side.write_text("{")
        match = "not JSON"
    else:
        body["signature"] = json.loads(sign(save(tmp_path / "x.kvf", *kv(9), ids(9)),
                                            keys_dir / "pub.key").read_text())["signature"]
        side.write_text(json.dumps(body))
        match = "not valid"
    with pytest.raises(SignatureError, match=match) as e:
        verify_signature(signed, trusted)
    assert str(signed) in str(e.value) or str(side) in str(e.value)


# -- fuzzing: every change is refused ----------------------------------------------------------------------
def _variants(base_keys, base_values, base_ids, rng: random.Random):
    """Valid .kvf files (checksums recomputed by save_kv) that differ from the signed one in one way."""
    keys, values = [k.clone() for k in base_keys], [v.clone() for v in base_values]
    token_ids = list(base_ids)
    kind = rng.choice(["swap chunks", "reorder ranges", "drop chunk", "drop layer", "fingerprint", "token id",
                       "one element", "swap k v", "dtype"])
    fp = FP
    if kind == "swap chunks":  # two equal-length token ranges of one layer trade places
        layer = rng.randrange(LAYERS)
        a, b = 0, CHUNK
        for t in (keys, values):
            t[layer][a:a + CHUNK], t[layer][b:b + CHUNK] = t[layer][b:b + CHUNK].clone(), t[layer][a:a + CHUNK].clone()
    elif kind == "reorder ranges":  # whole layers trade places
        keys, values = keys[::-1], values[::-1]
    elif kind == "drop chunk":
        keys, values, token_ids = [k[:-8] for k in keys], [v[:-8] for v in values], token_ids[:-8]
    elif kind == "drop layer":
        keys, values = keys[:-1], values[:-1]
    elif kind == "fingerprint":
        fp = OTHER_FP
    elif kind == "token id":
        i = rng.randrange(TOKENS)
        token_ids[i] = (token_ids[i] + 1 + rng.randrange(100)) % 1000
    elif kind == "one element":
        t = rng.choice(keys + values)
        t.view(-1)[rng.randrange(t.numel())] += 1
    elif kind == "swap k v":
        keys, values = values, keys
    else:
        keys, values = [k.to(torch.float16) for k in keys], [v.to(torch.float16) for v in values]
    return kind, keys, values, token_ids, fp


def fuzz(tmp_path: Path, keys_dir: Path, n: int, seed: int = 0) -> dict[str, int]:
    """Apply ``n`` random changes to signed artifacts; return how many of each kind were refused (all must be)."""
    rng = random.Random(seed)
    trusted = [keys_dir / "pub.key.pub"]
    base_keys, base_values = kv(1)
    base_ids = ids(1)
    original = save(tmp_path / "orig.kvf", base_keys, base_values, base_ids)
    sign(original, keys_dir / "pub.key")
    other = save(tmp_path / "other.kvf", *kv(2), ids(2))
    sign(other, keys_dir / "pub.key")
    data = original.read_bytes()
    victim = tmp_path / "victim.kvf"
    shutil.copy(sig_path(original), sig_path(victim))
    refused: dict[str, int] = {}
    for i in range(n):
        r = rng.random()
        if r < 0.8:  # a bit flip anywhere in the file, or in its signature sidecar
            kind = "bit flip"
            if rng.random() < 0.9:
                buf = bytearray(data)
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                victim.write_bytes(buf)
                shutil.copy(sig_path(original), sig_path(victim))
            else:
                kind = "sidecar bit flip"
                victim.write_bytes(data)
                side = bytearray(sig_path(original).read_bytes())
                side[rng.randrange(len(side))] ^= 1 << rng.randrange(7)  # keep it ASCII-ish: JSON may still parse
                sig_path(victim).write_bytes(side)
        elif r < 0.85:  # a genuine signature of another artifact, replayed
            kind = "replayed signature"
            victim.write_bytes(data)
            shutil.copy(sig_path(other), sig_path(victim))
        else:
            kind, k, v, t, fp = _variants(base_keys, base_values, base_ids, rng)
            save(victim, k, v, t, fp)
            shutil.copy(sig_path(original), sig_path(victim))
        try:
            verify_signature(victim, trusted, threads=1)
        except (SignatureError, FormatError):
            refused[kind] = refused.get(kind, 0) + 1
        except KvfastError as exc:  # any other named kvfast error is a refusal too, but should not happen
            raise AssertionError(f"change {i} ({kind}) raised {type(exc).__name__}: {exc}") from exc
        else:
            raise AssertionError(f"change {i} ({kind}) was accepted")
    return refused


def test_ten_thousand_fuzzed_changes_are_all_refused(tmp_path, keys_dir):
    refused = fuzz(tmp_path, keys_dir, FUZZ_CHANGES)
    assert sum(refused.values()) == FUZZ_CHANGES
    assert len(refused) >= 10, refused  # every kind of change was exercised


# -- load and store ----------------------------------------------------------------------------------------
def test_load_with_trusted_keys(signed, keys_dir, tmp_path):
    cache = kvfast.PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=8, block_size=16,
                                dtype=torch.bfloat16)
    seq = kvfast.load(signed, cache, fingerprint=FP, trusted_keys=[keys_dir / "pub.key.pub"])
    k, _ = cache.gather(seq, 0)
    assert torch.equal(k, kv(0)[0][0])
    cache.free(seq)
    free = cache.num_free_blocks
    with pytest.raises(SignatureError, match="not among"):
        kvfast.load(signed, cache, fingerprint=FP, trusted_keys=[keys_dir / "other.key.pub"])
    unsigned = save(tmp_path / "u.kvf", *kv(0), ids(0))
    with pytest.raises(SignatureError, match="no signature"):
        kvfast.load(unsigned, cache, fingerprint=FP, trusted_keys=[keys_dir / "pub.key.pub"])
    assert cache.num_free_blocks == free  # refused before any block was taken


def test_store_verifies_once_on_ingest_and_refuses_unsigned(signed, keys_dir, tmp_path):
    pub = keys_dir / "pub.key.pub"
    store = kvfast.Store(tmp_path / "store", trusted_keys=[pub])
    entry = store.put(signed)
    assert entry.provenance == "signed:" + key_id(load_public_key(pub))
    side = json.loads(entry.path.with_suffix(".json").read_text())
    assert side["signature"]["verified"]["merkle_root"] == json.loads(sig_path(signed).read_text())["statement"]["merkle_root"]
    unsigned = save(tmp_path / "u.kvf", *kv(3), ids(3))
    with pytest.raises(SignatureError, match="not stored"):
        store.put(unsigned)
    with pytest.raises(SignatureError):
        store.put((kv(3)), token_ids=ids(3), fingerprint=FP)
    # An entry another (non-trusting) process put is refused at attach, by name.
    kvfast.Store(tmp_path / "store").put(unsigned)
    cache = kvfast.PagedKVCache(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, num_blocks=16, block_size=16,
                                dtype=torch.bfloat16)
    with pytest.raises(SignatureError, match="unsigned"):
        store.attach(FP, ids(3) + [1], cache)
    seq, n = store.attach(FP, ids(0) + [1], cache)  # the verified entry: no re-hashing, just the record
    assert n == TOKENS
    other_store = kvfast.Store(tmp_path / "store", trusted_keys=[keys_dir / "other.key.pub"])
    with pytest.raises(SignatureError, match="not signed by a trusted key"):
        other_store.attach(FP, ids(0) + [1], cache)


def test_store_refuses_altered_copy(signed, keys_dir, tmp_path):
    data = bytearray(signed.read_bytes())
    data[-1] ^= 0x10
    altered = tmp_path / "altered.kvf"
    altered.write_bytes(bytes(data))
    shutil.copy(sig_path(signed), sig_path(altered))
    store = kvfast.Store(tmp_path / "store", trusted_keys=[keys_dir / "pub.key.pub"])
    with pytest.raises(SignatureError, match="merkle_root"):
        store.put(altered, verify=False)
    assert store.list() == [] and not any(os.scandir(store.root / ".tmp"))


def test_cli_keygen_sign_and_trusted_put(tmp_path, capsys):
    from kvfast.cli import main

    assert main(["keygen", str(tmp_path / "k")]) == 0
    assert "key id ed25519:" in capsys.readouterr().out
    assert main(["keygen", str(tmp_path / "k")]) == 2  # never overwrites a key
    path = save(tmp_path / "d.kvf", *kv(0), ids(0))
    unsigned = save(tmp_path / "u.kvf", *kv(1), ids(1))
    assert main(["sign", str(path), "--key", str(tmp_path / "k")]) == 0
    verify_signature(path, [tmp_path / "k.pub"])
    put = ["store", "put", str(tmp_path / "store"), "--trusted-key", str(tmp_path / "k.pub")]
    assert main(put + [str(path)]) == 0
    assert main(put + [str(unsigned)]) == 2
    assert "no signature" in capsys.readouterr().err


def test_verifies_the_bytes_the_reader_opened_not_a_file_renamed_in_later(tmp_path, keys_dir):
    genuine = save(tmp_path / "genuine.kvf", *kv(0), ids(0))
    sign(genuine, keys_dir / "pub.key")
    keys, values = kv(0)
    keys[0].view(-1)[5] += 1  # same tokens, model and shape: only the KV differs
    path = save(tmp_path / "doc.kvf", keys, values, ids(0))
    shutil.copy(sig_path(genuine), sig_path(path))
    with kvfast.open(path) as reader:
        os.replace(genuine, path)  # swapped in after the open, before the hashing
        with pytest.raises(SignatureError, match="differs from the file"):
            verify_signature(reader, [keys_dir / "pub.key.pub"])


def test_unsigned_kv_loads_without_the_cryptography_package(tmp_path):
    """The GPU machines' images have no ``cryptography``: importing kvfast and loading unsigned KV must not need
    it, and signing there says what to install. A real interpreter with the package made unimportable."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["cryptography"] = None  # what Python does for a package that is not installed
import torch, kvfast
fp = "sha256:" + "ab" * 32
kvfast.save_kv({str(tmp_path / 'doc.kvf')!r}, [torch.randn(8, 2, 4)], [torch.randn(8, 2, 4)], range(8), fingerprint=fp)
cache = kvfast.PagedKVCache(1, 2, 4, num_blocks=4, block_size=4, dtype=torch.float32)
kvfast.load({str(tmp_path / 'doc.kvf')!r}, cache, fingerprint=fp)
try:
    kvfast.keygen({str(tmp_path / 'key')!r})
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs the 'cryptography' package" in out.stdout
