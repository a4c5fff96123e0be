""".kvf files with codec="lossless" (expcode-v2, docs/FORMAT.md §7.2) and "expcode-v1" (§7.1): written, read,
loaded into paged caches bit for bit like raw files, on every decoder; damage refused by checksum or by the
decoder, naming file and chunk."""
from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton decoder runs in the interpreter (tests/test_kernels.py)

import kvfast  # noqa: E402
from kvfast.format import codec as codecs  # noqa: E402
from kvfast.loader import reference  # noqa: E402
from kvfast._backend import native  # noqa: E402
from kvfast.format.codec import CodecError  # noqa: E402
from kvfast.errors import ChecksumError, LayoutError, UnsupportedCodecError  # noqa: E402
from tests.conftest import random_ids, tiny_model  # noqa: E402
from tests.test_cli import kvfast_cli  # noqa: E402
from tests.test_format import manifest_bytes, refused, with_manifest, written  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 16, 48]
BACKENDS = ["auto", "python"]
CODECS = ["lossless", "expcode-v1"]  # the alias writes expcode-v2; files written with v1 keep loading
LAYERS, HEADS, HEAD_DIM, TOKENS, CHUNK = 2, 2, 32, 150, 64  # 150: a short last chunk of 22 tokens
FP = "sha256:" + "cd" * 32


def kv_like(dtype, seed=0, tokens=TOKENS):
    """Per-layer K and V with per-channel magnitudes (keys) and a few special values, like real KV."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, HEAD_DIM)
    keys = [(torch.randn(tokens, HEADS, HEAD_DIM, generator=g) * scale).to(dtype) for _ in range(LAYERS)]
    values = [torch.randn(tokens, HEADS, HEAD_DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    keys[0][3, 0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), float("-inf")])
    values[0][::3] = values[0][1].clone()  # layer 0's V repeats with its tokens: expcode-v2 stores references
    return keys, values


def save(path, dtype, codec, seed=0, chunk_tokens=CHUNK):
    keys, values = kv_like(dtype, seed)
    ids = random_ids(TOKENS, seed=seed)
    kvfast.save_kv(path, keys, values, ids, fingerprint=FP, chunk_tokens=chunk_tokens, codec=codec)
    return path, keys, values


def bits(t):
    return t.contiguous().view(torch.uint8)


def assert_holds(cache, seq, keys, values, n):
    for layer in range(LAYERS):
        k, v = (t.cpu() for t in cache.gather(seq, layer))
        assert torch.equal(bits(k), bits(keys[layer][:n])) and torch.equal(bits(v), bits(values[layer][:n]))


def new_cache(dtype, layout="NHD", block_size=16, device="cpu"):
    return kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=TOKENS // block_size + 4, block_size=block_size,
                               dtype=dtype, layout=layout, device=device)


# -- writing and reading -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
def test_coded_file_is_smaller_names_its_codec_and_reads_back_bit_exactly(dtype, codec, tmp_path):
    raw, keys, values = save(tmp_path / "raw.kvf", dtype, "raw")
    coded, *_ = save(tmp_path / "coded.kvf", dtype, codec)
    assert json.loads(manifest_bytes(coded.read_bytes()))["codec"] == codecs.resolve(codec)  # the versioned name
    with kvfast.open(coded) as r:
        assert all(c.length < c.raw_length for c in r.chunks)  # every chunk really is coded
        for layer in range(LAYERS):
            for a, b in [(0, TOKENS), (5, 70), (128, 150)]:
                k, v = r.read_layer(layer, a, b)
                assert torch.equal(bits(k), bits(keys[layer][a:b])) and torch.equal(bits(v), bits(values[layer][a:b]))
        r.verify()
    assert coded.stat().st_size < raw.stat().st_size


def test_writer_refuses_unknown_codecs_naming_them(tmp_path):
    keys, values = kv_like(torch.bfloat16)
    with pytest.raises(UnsupportedCodecError, match="'lz77'"):
        kvfast.save_kv(tmp_path / "x.kvf", keys, values, range(TOKENS), fingerprint=FP, codec="lz77")
    assert not list(tmp_path.iterdir())


def test_reader_refuses_the_alias_and_a_stored_length_above_raw(tmp_path):
    path, *_ = save(tmp_path / "doc.kvf", torch.bfloat16, "lossless")
    blob = path.read_bytes()
    refused(written(tmp_path, with_manifest(blob, lambda b: b.update(codec="lossless"))), UnsupportedCodecError,
            "'lossless'")

    def grow(body):
        body["chunks"][-1][1] = body["chunks"][-1][2] + 1
    refused(written(tmp_path, with_manifest(blob, grow) + b"\0"), LayoutError, "exceeds its raw length")


# -- loading into paged caches -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])])
def test_coded_file_loads_bitwise_like_the_raw_one(dtype, layout, block_size, codec, device, tmp_path):
    """CPU caches: decoded on the host; CUDA caches: the stored bytes go to the GPU and Triton decodes them."""
    raw, keys, values = save(tmp_path / "raw.kvf", dtype, "raw", seed=1)
    coded, *_ = save(tmp_path / "coded.kvf", dtype, codec, seed=1)
    from_raw, from_coded = (new_cache(dtype, layout, block_size, device) for _ in range(2))
    seq_raw = kvfast.load(raw, from_raw, fingerprint=FP)
    handle = kvfast.load_async(coded, from_coded, fingerprint=FP)
    seq_coded = handle.wait()
    assert handle.method == "decode"
    assert_holds(from_coded, seq_coded, keys, values, TOKENS)
    for layer in range(LAYERS):  # the same pages, byte for byte, as the raw file gives
        for a, b in ((from_raw.key_cache(layer), from_coded.key_cache(layer)),
                     (from_raw.value_cache(layer), from_coded.value_cache(layer))):
            assert torch.equal(bits(a), bits(b))
    assert seq_raw.block_table == seq_coded.block_table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens", [1, 63, 64, 100, TOKENS])
def test_prefix_loads_decode_only_what_they_need(backend, num_tokens, tmp_path):
    if backend == "auto" and native is None:
        pytest.skip("kvfast._C is not built")
    path, keys, values = save(tmp_path / "doc.kvf", torch.bfloat16, "lossless", seed=2)
    cache = new_cache(torch.bfloat16)
    seq = kvfast.load(path, cache, fingerprint=FP, num_tokens=num_tokens, backend=backend, threads=2)
    assert_holds(cache, seq, keys, values, num_tokens)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is present: Triton runs compiled")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])])
def test_triton_decoder_fills_the_cache_like_the_host_path(layout, codec, device, tmp_path):
    """The device path of the loader (Triton decode straight into the pages; without a GPU on CPU tensors in the
    interpreter): a prefix of 40 tokens ends inside the third 16-token chunk (v2: with repeated V rows on both
    sides of the cut). Short chunks keep the interpreter's serial loop short."""
    pytest.importorskip("triton")
    num_tokens = 40
    path, keys, values = save(tmp_path / "doc.kvf", torch.bfloat16, codec, seed=3, chunk_tokens=16)
    cache = new_cache(torch.bfloat16, layout, block_size=16, device=device)
    seq = cache.new_sequence()
    slots = cache.append_slots(seq, num_tokens)
    with kvfast.open(path) as r:
        # the loaded chunks are coded, else the host path would copy them verbatim (the 6-token tail is)
        assert all(c.length < c.raw_length for c in r.chunks if c.start < num_tokens)
        reference.copy_chunks(r, cache.pages, slots, num_tokens, True, device_decode=True)
    assert_holds(cache, seq, keys, values, num_tokens)


# -- damage ----------------------------------------------------------------------------------------------
def test_damaged_coded_chunk_is_refused_and_the_cache_is_left_as_it_was(tmp_path):
    path, *_ = save(tmp_path / "doc.kvf", torch.bfloat16, "lossless", seed=4)
    with kvfast.open(path) as r:
        chunk = r.chunks[-1]
    data = bytearray(path.read_bytes())
    data[chunk.offset + 10] ^= 0x40  # in the header: expcode-v2's count of repeated V rows
    path.write_bytes(bytes(data))
    cache = new_cache(torch.bfloat16)
    for backend in BACKENDS:
        with pytest.raises(ChecksumError, match=f"chunk {chunk.index}"):
            kvfast.load(path, cache, fingerprint=FP, backend=backend)
        assert cache.num_used_blocks == 0
    # without the checksum, the decoder's own checks refuse the inconsistent bytes, naming file and chunk
    for backend in BACKENDS:
        with pytest.raises(CodecError) as info:
            kvfast.load(path, cache, fingerprint=FP, backend=backend, verify=False)
        assert str(info.value).startswith(f"{path}: chunk {chunk.index}")
        assert cache.num_used_blocks == 0


# -- publish and the CLI ------------------------------------------------------------------------------
def test_publish_with_codec_loads_bitwise_like_raw(tmp_path):
    model = tiny_model("qwen3", torch.bfloat16, head_dim=64)
    doc = random_ids(200, seed=5)
    raw = kvfast.publish(model, doc, tmp_path / "raw.kvf", chunk_tokens=64)
    coded = kvfast.publish(model, doc, tmp_path / "coded.kvf", chunk_tokens=64, codec="lossless")
    with kvfast.open(raw) as a, kvfast.open(coded) as b:
        assert b.manifest.codec == "expcode-v2" and all(c.length < c.raw_length for c in b.chunks)
        for layer in range(a.manifest.num_layers):
            assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a.read_layer(layer), b.read_layer(layer)))


def test_cli_publish_codec_lossless(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama", torch.bfloat16).save_pretrained(model_dir)
    (tmp_path / "doc.txt").write_text(" ".join(map(str, random_ids(200, seed=6))))
    (tmp_path / "q.txt").write_text(" ".join(map(str, random_ids(8, seed=7))))
    out = kvfast_cli("publish", model_dir, "--token-ids", tmp_path / "doc.txt", "-o", tmp_path / "doc.kvf",
                     "--codec", "lossless").stdout
    assert "wrote" in out
    assert json.loads(kvfast_cli("inspect", tmp_path / "doc.kvf", "--json").stdout)["codec"] == "expcode-v2"
    report = json.loads(kvfast_cli("verify", model_dir, tmp_path / "doc.kvf", "--prompt-ids", tmp_path / "q.txt",
                                   "--json").stdout)
    assert report["ok"] and report["kv_bitwise_equal"]
    assert "--codec" in kvfast_cli("publish", "--help").stdout


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(0, 10**6), pos=st.integers(0, 10**9), xor=st.integers(1, 255))
def test_any_damaged_stored_byte_is_a_checksum_error(tmp_path, chunk, pos, xor):
    path = tmp_path / "doc.kvf"
    if not path.exists():
        save(path, torch.bfloat16, "lossless", seed=5)
    clean = path.read_bytes()
    with kvfast.open(path) as r:
        c = r.chunks[chunk % len(r.chunks)]
    data = bytearray(clean)
    data[c.offset + pos % c.length] ^= xor
    bad = tmp_path / "bad.kvf"
    bad.write_bytes(bytes(data))
    with kvfast.open(bad) as r, pytest.raises(ChecksumError, match=f"chunk {c.index}"):
        r.read_layer(c.layer, c.start, c.stop)
