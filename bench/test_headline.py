"""The headline figures as a pytest-benchmark suite: each kvfast case with its baseline timed in the same run.

    pytest bench --benchmark-only                                  # the table (medians, rounds, ...)
    pytest bench --benchmark-only --benchmark-json=run.json        # ratios in each benchmark's extra_info
    pytest bench --benchmark-only --benchmark-autosave             # saved under .benchmarks/, for ...
    pytest bench --benchmark-only --benchmark-compare              # ... the next run to compare against
    pytest bench --benchmark-only --bench-size small               # CI: the same cases on a few MB

Each benchmark times kvfast with pytest-benchmark and, in the same test, the baseline it is measured against
(same data, same rounds, median), and records both in ``extra_info``: ``baseline``, ``baseline_s``, and the
ratio named after what it says (``fraction_of_bound``, ``speedup``, ``size_ratio``). A ratio from one run holds
the machine's load constant; absolute seconds from two runs do not. The table-printing scripts beside this file
(bench_load.py, bench_codec.py, ...) sweep more cases and write bench/RESULTS.md.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import kvfast
from kvfast.format import codec as codecs
from kvfast._backend import native

BLOCK_SIZE, CHUNK_TOKENS = 16, 256
FP = "sha256:" + "0b" * 32  # random KV: any fingerprint will do
ROUNDS = 5


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    head_dim: int
    tokens: int

    @property
    def kv_bytes(self) -> int:
        return 2 * self.layers * self.tokens * self.heads * self.head_dim * 2  # bfloat16


SHAPES = {"full": Shape(28, 8, 128, 4096),  # Qwen3-0.6B's KV, a 4096-token document: 470 MB
          "small": Shape(4, 2, 64, 512)}


def median_seconds(run: Callable[[], object], rounds: int = ROUNDS) -> float:
    """The baseline's median over ``rounds`` runs after one warm-up, timed like pytest-benchmark's pedantic."""
    run()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def record(benchmark, baseline: str, baseline_s: float, **ratios: float) -> None:
    benchmark.extra_info.update(baseline=baseline, baseline_s=baseline_s, **ratios)


# -- the document: random bf16 KV as .kvf and .safetensors, and a paged cache allocated once -------------------
@dataclass
class Document:
    shape: Shape
    kvf: Path
    safetensors: Path
    keys: list[torch.Tensor]  # [layers] x [tokens, heads, head_dim]
    values: list[torch.Tensor]
    cache: kvfast.PagedKVCache


@pytest.fixture(scope="module")
def document(tmp_path_factory, bench_size) -> Document:
    from safetensors.torch import save_file

    s = SHAPES[bench_size]
    folder = tmp_path_factory.mktemp("bench-doc")
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(s.tokens, s.heads, s.head_dim, generator=g).to(torch.bfloat16) for _ in range(s.layers)]
    values = [torch.randn(s.tokens, s.heads, s.head_dim, generator=g).to(torch.bfloat16) for _ in range(s.layers)]
    ids = torch.randint(0, 151_936, (s.tokens,), generator=g)
    kvf = kvfast.save_kv(folder / "doc.kvf", keys, values, ids, fingerprint=FP, chunk_tokens=CHUNK_TOKENS)
    save_file({f"{kv}.{l}": t for l in range(s.layers) for kv, t in (("k", keys[l]), ("v", values[l]))},
              folder / "doc.safetensors")
    # allocated (and every page written) once: no load pays for first-touch page faults
    cache = kvfast.PagedKVCache(s.layers, s.heads, s.head_dim, num_blocks=s.tokens // BLOCK_SIZE + 4,
                                block_size=BLOCK_SIZE, dtype=torch.bfloat16, layout="NHD")
    for path in (kvf, folder / "doc.safetensors"):  # hot: both files in the page cache
        path.read_bytes()
    return Document(s, kvf, folder / "doc.safetensors", keys, values, cache)


def load_and_free(doc: Document, **options) -> None:
    doc.cache.free(kvfast.load(doc.kvf, doc.cache, fingerprint=FP, **options))


def safetensors_load_and_free(doc: Document) -> None:
    """The usual way: safetensors.torch.load_file, then one index_copy_ per layer and K/V into the pages."""
    from safetensors.torch import load_file

    tensors = load_file(doc.safetensors)
    seq = doc.cache.new_sequence()
    slots = doc.cache.append_slots(seq, doc.shape.tokens)
    for layer in range(doc.shape.layers):
        for kv, pages in (("k", doc.cache.key_cache(layer)), ("v", doc.cache.value_cache(layer))):
            pages.view(-1, doc.shape.heads, doc.shape.head_dim).index_copy_(0, slots, tensors[f"{kv}.{layer}"])
    doc.cache.free(seq)


LOADS = {"python": {"backend": "python"}, "native": {"backend": "native", "threads": 2}}


# -- load vs the one-copy bound, and vs safetensors ----------------------------------------------------------
@pytest.mark.parametrize("path", list(LOADS))
def test_load_vs_one_copy_bound(benchmark, document, path):
    """kvfast.load of a hot file against numpy.copyto of as many bytes between two preallocated buffers."""
    if LOADS[path]["backend"] == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    src, dst = np.ones(document.shape.kv_bytes, np.uint8), np.zeros(document.shape.kv_bytes, np.uint8)
    bound_s = median_seconds(lambda: np.copyto(dst, src))
    benchmark.pedantic(load_and_free, args=(document,), kwargs=LOADS[path], rounds=ROUNDS, warmup_rounds=1)
    load_s = benchmark.stats.stats.median
    record(benchmark, "numpy.copyto of the KV bytes (one-copy bound)", bound_s, fraction_of_bound=bound_s / load_s,
           kv_bytes=document.shape.kv_bytes, GB_per_s=document.shape.kv_bytes / load_s / 1e9)


@pytest.mark.parametrize("path", list(LOADS))
def test_load_vs_safetensors(benchmark, document, path):
    """kvfast.load into the paged cache against safetensors.load_file + index_copy_ into the same cache."""
    if LOADS[path]["backend"] == "native" and native is None:
        pytest.skip("kvfast._C is not built")
    baseline_s = median_seconds(lambda: safetensors_load_and_free(document))
    benchmark.pedantic(load_and_free, args=(document,), kwargs=LOADS[path], rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, "safetensors.torch.load_file + index_copy_", baseline_s,
           speedup=baseline_s / benchmark.stats.stats.median)


# -- the lossless codec vs zstd ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunks(document) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every chunk's K and V as uint8 ``[t, H, head_dim * 2]`` views, as the writer hands them to the codec."""
    out = []
    for k, v in zip(document.keys, document.values):
        for a in range(0, k.shape[0], CHUNK_TOKENS):
            out.append(tuple(x[a : a + CHUNK_TOKENS].contiguous().view(torch.uint8).numpy()
                             .reshape(x[a : a + CHUNK_TOKENS].shape[0], x.shape[1], -1) for x in (k, v)))
    return out


def zstd():
    return pytest.importorskip("zstandard", reason="zstandard is the baseline (pip install kvfast[test])")


def test_codec_encode_vs_zstd(benchmark, chunks):
    """expcode-v2 encode of every chunk against zstd -3 of the same bytes; sizes of both."""
    z = zstd().ZstdCompressor(level=3)
    raw = [k.tobytes() + v.tobytes() for k, v in chunks]
    zstd_s = median_seconds(lambda: [z.compress(b) for b in raw])
    coded = benchmark.pedantic(lambda: [codecs.encode_chunk("expcode-v2", k, v, 2) for k, v in chunks],
                               rounds=ROUNDS, warmup_rounds=1)
    total = sum(map(len, raw))
    record(benchmark, "zstd -3 compress", zstd_s, speedup=zstd_s / benchmark.stats.stats.median,
           size_ratio=total / sum(map(len, coded)), zstd_size_ratio=total / sum(len(z.compress(b)) for b in raw),
           MB_per_s=total / benchmark.stats.stats.median / 1e6)


def test_codec_decode_vs_zstd(benchmark, chunks, document):
    """expcode-v2 decode of every chunk against zstd decompression of the same data."""
    from kvfast.format import codec

    z = zstd()
    raw = [k.tobytes() + v.tobytes() for k, v in chunks]
    packed = [z.ZstdCompressor(level=3).compress(b) for b in raw]
    d = z.ZstdDecompressor()
    zstd_s = median_seconds(lambda: [d.decompress(p) for p in packed])
    coded = [np.frombuffer(codec.encode_chunk("expcode-v2", k, v, 2), np.uint8) for k, v in chunks]
    outs = [np.empty(len(b), np.uint8) for b in raw]
    s = document.shape

    def decode():
        for c, out, (k, _) in zip(coded, outs, chunks):
            codec.decode_chunk("expcode-v2", c, out, k.shape[0], s.heads, s.head_dim, 2)

    benchmark.pedantic(decode, rounds=ROUNDS, warmup_rounds=1)
    assert all(out.tobytes() == b for out, b in zip(outs, raw))  # lossless, or the figure means nothing
    total = sum(map(len, raw))
    record(benchmark, "zstd -3 decompress", zstd_s, speedup=zstd_s / benchmark.stats.stats.median,
           MB_per_s=total / benchmark.stats.stats.median / 1e6)


# -- the store: attach a stored document instead of prefilling it -------------------------------------------------
def test_store_attach_vs_prefill(benchmark, tmp_path, bench_size):
    """Store.attach of a stored document into a fresh cache (from the store's RAM tier) against the model's
    prefill of the same tokens: the work attach saves."""
    from tests.conftest import random_ids, tiny_model

    tokens = 1024 if bench_size == "full" else 256
    model = tiny_model("llama", torch.float32, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_hidden_layers=4, max_position_embeddings=4096)
    doc = random_ids(tokens, seed=5)
    store = kvfast.Store(tmp_path / "store")
    store.publish(model, doc)
    prefill_s = median_seconds(lambda: kvfast.capture_kv(model, doc))

    def attach():
        cache = kvfast.PagedKVCache.for_model(model, num_blocks=tokens // BLOCK_SIZE + 4)
        seq, n = store.attach(model, doc, cache, min_rest=0)
        assert n == tokens
        return cache, seq

    benchmark.pedantic(attach, rounds=ROUNDS, warmup_rounds=1)
    record(benchmark, "prefill of the document (kvfast.capture_kv)", prefill_s,
           speedup=prefill_s / benchmark.stats.stats.median, tokens=tokens)


# -- a background save's gather out of vLLM CPU's pages (K transposed in each block) ---------------------------
def test_save_gather_vs_torch_copy(benchmark, bench_size):
    """KVPages.gather of a prompt out of vLLM CPU's layout (native) against the PyTorch copy a save used before."""
    from bench_gather import BLOCK, vllm_cpu_pages

    from kvfast.cache import ops

    if native is None:
        pytest.skip("kvfast._C is not built")
    shape = SHAPES[bench_size]
    blocks = -(-shape.tokens // BLOCK)
    pages = vllm_cpu_pages(blocks, shape.layers, shape.heads, shape.head_dim)
    table = list(range(blocks))[::-1]

    def reference() -> None:
        for layer in range(shape.layers):
            ops.gather_kv(pages.keys[layer], pages.values[layer], torch.tensor(table), shape.tokens, layout="HND")

    torch_s = median_seconds(reference)
    got = benchmark.pedantic(lambda: [pages.gather(layer, table, shape.tokens) for layer in range(shape.layers)],
                             rounds=ROUNDS, warmup_rounds=1)
    want = ops.gather_kv(pages.keys[-1], pages.values[-1], torch.tensor(table), shape.tokens, layout="HND")
    assert all(torch.equal(a, b) for a, b in zip(got[-1], want))
    record(benchmark, "torch copy out of the strided views (ops.gather_kv)", torch_s,
           speedup=torch_s / benchmark.stats.stats.median, kv_bytes=shape.kv_bytes)

