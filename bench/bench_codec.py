"""The lossless codec (expcode-v2, and v1) against generic compressors and entropy bounds, on real models' bf16 KV.

KV sources, each prefilled in bfloat16 on the CPU:

- ``stories260K``: the trained tiny Llama in ../shared/models (head_dim 8), over its own greedy story of
  ``--story-tokens`` tokens from BOS (in-distribution text);
- ``qwen3`` / ``llama``: random-weight models with real shapes at head_dim 128 (Qwen3-0.6B's attention: 16
  heads, 8 KV heads, q/k-norm; Llama-3.2-3B's: 24 heads, 8 KV heads), ``--layers`` layers, a vocabulary of
  4096, over ``--doc-tokens`` random tokens. Random weights give KV of another distribution than trained ones:
  the table says which is which.

For K, V and both, the ratio (raw bytes / compressed bytes) of zstd -3, zstd -19, lz4, a byte-plane split
(exponent bytes and sign/mantissa bytes compressed apart with zstd -19) and expcode-v1 / expcode-v2 (v1 + rows
that repeat stored once) as the file stores them (chunks of 256 tokens, tables, repeat lists and directory
included), beside two bounds for coding the exponent byte with
the sign/mantissa byte stored raw: order-0 (one symbol distribution over all of the set) and conditioned on
(layer, head, channel). Then the C++ codec's encode and decode speed (MB/s of raw KV, one thread and all
threads), and ``kvfast.publish`` with the codec against raw publish on the same model and document.

Run:
    python bench/bench_codec.py                               # prints the tables
    python bench/bench_codec.py --results bench/RESULTS.md    # also writes the "## Lossless codec" section
    python bench/bench_codec.py --json OUT/bench_codec_gpu.json   # on a GPU: adds Triton decode and file->GPU
    python bench/bench_codec.py --gpu-only --json OUT/bench_codec_gpu.json   # only that (bench/gpu_check.sh)

zstd and lz4 are optional baselines (``zstandard``, ``lz4``): without them their columns are left out, with a line
saying so (the GPU image has neither, and no network to fetch them).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kvfast
from kvfast import _C
from kvfast.format.codec import expcode
from kvfast.hf.capture import capture_kv
from report import machine, write_section

try:  # optional baselines (see the docstring)
    import lz4.frame
except ImportError:
    lz4 = None
try:
    import zstandard
except ImportError:
    zstandard = None

SECTION = "## Lossless codec"
STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
CHUNK_TOKENS = 256


# -- KV sources -------------------------------------------------------------------------------------------
def stories_kv(tokens: int):
    from transformers import DynamicCache, LlamaForCausalLM

    from kvfast.hf.generate import decode

    model = LlamaForCausalLM.from_pretrained(STORIES).eval()
    story = [1] + decode(model, DynamicCache(), [1], max_new_tokens=tokens - 1, return_logits=False).tokens
    model = model.to(torch.bfloat16)
    return model, story, capture_kv(model, story)


def random_model(kind: str, layers: int):
    from kvfast.configs import build_model, get_config

    if kind == "qwen3":
        config = get_config("qwen3-0.6b")
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                             head_dim=128, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
    config.num_hidden_layers, config.vocab_size = layers, 4096
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = layers
    return build_model(config, dtype=torch.bfloat16)


def model_kv(kind: str, layers: int, tokens: int):
    model = random_model(kind, layers)
    doc = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, doc, capture_kv(model, doc)


# -- ratios and bounds ------------------------------------------------------------------------------------
def raw_bytes(tensors) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)


def entropy(counts: np.ndarray) -> float:
    """Shannon entropy in bits of the distribution with these counts along the last axis, summed over the rest
    (so: total information in bits)."""
    counts = counts.astype(np.float64)
    totals = counts.sum(-1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return float(-(counts * logs).sum())


def symbols_of(t: torch.Tensor) -> np.ndarray:
    """The exponent symbols of bf16 ``t`` ``[tokens, H, D]``, as expcode-v1 splits them."""
    words = t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return expcode.split(words.reshape(-1), 2)[0].reshape(t.shape)


def bounds(tensors) -> tuple[float, float]:
    """Ratio bounds (order-0, conditioned on layer/head/channel) for bf16: 16 bits over 8 raw bits + the exponent
    symbol's information."""
    syms = [symbols_of(t) for t in tensors]  # each [tokens, H, D]
    n = sum(s.size for s in syms)
    order0 = entropy(np.bincount(np.concatenate([s.reshape(-1) for s in syms]), minlength=256))
    channel = 0.0
    for s in syms:
        flat = s.reshape(s.shape[0], -1).T.astype(np.int64)  # [H * D, tokens]
        counts = np.zeros((flat.shape[0], 256), dtype=np.int64)
        np.add.at(counts, (np.arange(flat.shape[0])[:, None], flat), 1)
        channel += entropy(counts)
    return 16 * n / (8 * n + order0), 16 * n / (8 * n + channel)


def expcode_sizes(keys, values, repeats: bool) -> list[int]:
    """[K bytes, V bytes] of expcode-v2 (``repeats``) or -v1 as a file with 256-token chunks stores them: each
    chunk's header, repeat lists, tables, raw bytes, directory and streams split between K and V (a verbatim chunk
    counts as raw)."""
    totals = [0.0, 0.0]
    for k, v in zip(keys, values):
        n, heads, head_dim = k.shape
        for a in range(0, n, CHUNK_TOKENS):
            kc, vc = (x[a : a + CHUNK_TOKENS].contiguous().view(torch.int16).numpy() for x in (k, v))
            t = kc.shape[0]
            seg = expcode.default_seg_tokens(head_dim, t)
            coded = np.frombuffer(_C.expcode_encode(kc, vc, t, heads, head_dim, 2, seg, 1, repeats=repeats), np.uint8)
            if len(coded) >= 2 * kc.nbytes:
                totals = [totals[0] + kc.nbytes, totals[1] + vc.nbytes]
                continue
            lay = expcode.parse_layout(coded, t, heads, head_dim, 2, "bench", repeats)
            header = int(lay.table_offsets[0]) - 8 * (len(lay.repeats[0]) + len(lay.repeats[1]))  # shared: halved
            tables, streams = np.diff(lay.table_offsets), np.diff(lay.seg_offsets)
            segments = np.split(streams, [int(lay.plane_segments[heads])])  # K planes' segments, V planes'
            for half in (0, 1):
                totals[half] += (header / 2 + 8 * len(lay.repeats[half]) + len(lay.kept[half]) * heads * head_dim
                                 + tables[half * heads : (half + 1) * heads].sum() + 4 * len(segments[half])
                                 + segments[half].sum())
    return [round(x) for x in totals]


def plane_split_zstd19(data: bytes) -> int:
    """Bytes of a byte-plane split of bf16 (exponent plane, sign/mantissa plane) each compressed with zstd -19."""
    words = np.frombuffer(data, dtype=np.uint16)
    symbols, raw = expcode.split(words, 2)
    z = zstandard.ZstdCompressor(level=19)
    return len(z.compress(symbols.tobytes())) + len(z.compress(raw.tobytes()))


def missing_baselines() -> list[str]:
    """A line for each optional baseline that is not installed (its columns are left out of the tables)."""
    return [f"bench_codec: {name} is not installed: its baseline columns are skipped"
            for name, module in (("zstandard", zstandard), ("lz4", lz4)) if module is None]


def ratio_rows(name: str, keys, values) -> list[dict]:
    rows = []
    v1, v2 = expcode_sizes(keys, values, False), expcode_sizes(keys, values, True)
    for part, tensors, pick in (("K", keys, lambda x: x[0]), ("V", values, lambda x: x[1]),
                                ("K+V", [*keys, *values], sum)):
        data = raw_bytes(tensors)
        order0, channel = bounds(tensors)
        row = {"model": name, "part": part, "MB": len(data) / 1e6}
        if zstandard is not None:
            row["zstd-3"] = len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))
            row["zstd-19"] = len(data) / len(zstandard.ZstdCompressor(level=19).compress(data))
        if lz4 is not None:
            row["lz4"] = len(data) / len(lz4.frame.compress(data))
        if zstandard is not None:
            row["planes+zstd-19"] = len(data) / plane_split_zstd19(data)
        row.update({"order-0 bound": order0, "channel bound": channel, "expcode-v1": len(data) / pick(v1),
                    "expcode-v2": len(data) / pick(v2)})
        row["v2 vs order-0"] = row["expcode-v2"] / order0
        if zstandard is not None:
            row["v2 vs zstd-19"] = row["expcode-v2"] / row["zstd-19"]
        rows.append(row)
    return rows


# -- speed ------------------------------------------------------------------------------------------------
def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def speed_rows(name: str, keys, values, repeat: int) -> list[dict]:
    """expcode-v2's encode and decode MB/s (raw KV bytes) of 256-token chunks on 1 thread and on every core."""
    chunks = []
    for k, v in zip(keys, values):
        for a in range(0, k.shape[0], CHUNK_TOKENS):
            kc, vc = (x[a : a + CHUNK_TOKENS].contiguous().view(torch.int16).numpy() for x in (k, v))
            chunks.append((kc, vc))
    total = sum(kc.nbytes + vc.nbytes for kc, vc in chunks)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        def encode():
            return [_C.expcode_encode(kc, vc, *kc.shape, 2, expcode.default_seg_tokens(kc.shape[2], kc.shape[0]),
                                      threads, repeats=True) for kc, vc in chunks]

        coded = encode()
        outs = [np.empty(kc.nbytes + vc.nbytes, np.uint8) for kc, vc in chunks]

        def decode():
            for c, out, (kc, _) in zip(coded, outs, chunks):
                _C.expcode_decode(c, out, *kc.shape, 2, threads, repeats=True)

        decode()
        for out, (kc, vc) in zip(outs, chunks):
            assert out.tobytes() == kc.tobytes() + vc.tobytes()
        rows.append({"model": name, "threads": threads, "encode MB/s": total / best_seconds(encode, repeat) / 1e6,
                     "decode MB/s": total / best_seconds(decode, repeat) / 1e6})
    return rows


def publish_row(name: str, model, doc, repeat: int) -> dict:
    """Median seconds of ``kvfast.publish`` raw and lossless, runs alternating so that drift hits both alike;
    3 x ``repeat`` runs each (a stories260K publish takes ~10 ms, where 5 runs are noise)."""
    times = {"raw": [], "lossless": []}
    with tempfile.TemporaryDirectory(prefix="kvfast-bench-codec-") as folder:
        for _ in range(3 * repeat):
            for codec, runs in times.items():
                t0 = time.perf_counter()
                kvfast.publish(model, doc, Path(folder) / f"{codec}.kvf", codec=codec)
                runs.append(time.perf_counter() - t0)
        sizes = {c: (Path(folder) / f"{c}.kvf").stat().st_size for c in times}
    raw, lossless = statistics.median(times["raw"]), statistics.median(times["lossless"])
    return {"model": name, "raw s": raw, "lossless s": lossless, "ratio": lossless / raw,
            "file ratio": sizes["raw"] / sizes["lossless"]}


# -- GPU (bench/gpu_check.sh) -----------------------------------------------------------------------------
def gpu_summary(model, doc, repeat: int, device: str = "cuda") -> dict:
    """Triton decode GB/s (output bytes) and file -> GPU cache load GB/s (raw KV bytes / s), codec vs raw; each
    checked bit for bit against the host decoder and the raw file first. (``device="cpu"`` with
    ``TRITON_INTERPRET=1`` runs the same steps in the interpreter: a check of this function, not a benchmark.)"""
    from kvfast.kernels import expcode as kernels

    cache_args = dict(num_blocks=len(doc) // 16 + 8, block_size=16, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    summary = {}
    with tempfile.TemporaryDirectory(prefix="kvfast-bench-codec-") as folder:
        paths = {c: kvfast.publish(model, doc, Path(folder) / f"{c}.kvf", codec=c) for c in ("raw", "lossless")}
        with kvfast.open(paths["lossless"]) as r:
            chunk = max(r.chunks, key=lambda c: c.raw_length)
            stored = r.read_stored(chunk)
            m = r.manifest
            pages = torch.zeros(2, chunk.raw_length // (2 * m.token_row_bytes) // 16 + 1, 16, m.num_kv_heads,
                                m.head_dim, dtype=m.dtype, device=device)
            slots = torch.arange(chunk.stop - chunk.start, device=device)
            kernels.decode_paged(stored, pages[0], pages[1], slots, repeats=True)
            k, v = r.split_chunk(chunk, r.read_chunk(chunk))  # the host decoder's bytes: the reference
            t = chunk.stop - chunk.start
            if not all(torch.equal(a.reshape(-1, m.num_kv_heads, m.head_dim)[:t].cpu().view(torch.int16),
                                   b[:t].view(torch.int16)) for a, b in zip(pages, (k, v))):
                raise AssertionError("the Triton decoder's chunk differs from the host decoder's: not timing it")
            secs = best_seconds(lambda: (kernels.decode_paged(stored, pages[0], pages[1], slots, repeats=True),
                                         sync()), repeat)
            summary["Triton decode GB/s (output, one chunk incl. host prep)"] = round(chunk.raw_length / secs / 1e9, 2)
            kv_bytes = sum(c.raw_length for c in r.chunks)
        loaded = {}
        for codec, path in paths.items():
            cache = kvfast.PagedKVCache(m.num_layers, m.num_kv_heads, m.head_dim, device=device, **cache_args)
            seq = kvfast.load(path, cache, fingerprint=m.fingerprint)
            loaded[codec] = [torch.cat(cache.gather(seq, layer)).cpu().view(torch.int16)
                             for layer in range(m.num_layers)]
            cache.free(seq)

            def load():
                seq = kvfast.load(path, cache, fingerprint=m.fingerprint)
                sync()
                cache.free(seq)

            summary[f"file -> GPU cache GB/s ({codec})"] = round(kv_bytes / best_seconds(load, repeat) / 1e9, 2)
        if not all(torch.equal(a, b) for a, b in zip(loaded["raw"], loaded["lossless"])):
            raise AssertionError("the lossless file loads into the GPU cache unlike the raw one: not timing it")
    summary["codec / raw load bandwidth"] = round(summary["file -> GPU cache GB/s (lossless)"]
                                                  / summary["file -> GPU cache GB/s (raw)"], 2)
    return summary


# -- report ---------------------------------------------------------------------------------------------
def table(rows: list[dict], fmt: dict[str, str]) -> str:
    keys = list(rows[0])
    align = ("---" if k in ("model", "part") else "---:" for k in keys)
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], fmt.get(k, ".2f")) if not isinstance(r[k], str) else r[k]
                                       for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--story-tokens", type=int, default=400, help="tokens of stories260K's story (max 512)")
    parser.add_argument("--doc-tokens", type=int, default=512, help="random tokens for the random-weight models")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random-weight models")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs per timing (best of N for the codec, median of 3N for publish)")
    parser.add_argument("--results", type=Path, default=None, help="write the tables into this RESULTS.md")
    parser.add_argument("--json", type=Path, default=None, help="save the rows (and, on a GPU, the GPU summary)")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the GPU summary (Triton decode, file -> GPU cache) on Qwen3-0.6B's shape")
    args = parser.parse_args(argv)
    if args.gpu_only:
        return gpu_only(args)
    for line in missing_baselines():
        print(line, file=sys.stderr)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = f"{when}; {machine()}."
    sources = []
    if (STORIES / "model.safetensors").exists():
        sources.append(("stories260K (trained)", lambda: stories_kv(args.story_tokens)))
    else:
        print(f"skipping stories260K: {STORIES} is absent", file=sys.stderr)
    sources += [(f"qwen3-0.6b x{args.layers}L (random)", lambda: model_kv("qwen3", args.layers, args.doc_tokens)),
                (f"llama-3b-shape x{args.layers}L (random)", lambda: model_kv("llama", args.layers, args.doc_tokens))]
    ratios, speeds, publishes, gpu = [], [], [], None
    for name, make in sources:
        print(f"... {name}", file=sys.stderr, flush=True)
        model, doc, (keys, values) = make()
        ratios += ratio_rows(name, keys, values)
        speeds += speed_rows(name, keys, values, args.repeat)
        publishes.append(publish_row(name, model, doc, args.repeat))
        if torch.cuda.is_available() and "qwen3" in name:
            gpu = gpu_summary(model, doc, args.repeat)
    cmd = " ".join(["python bench/bench_codec.py", *(argv if argv is not None else sys.argv[1:])])
    cmd = re.sub(r"\s*--(results|json)\s+\S+", "", cmd)
    body = (f"{head} `{cmd}`. KV in bfloat16 from a prefill on the CPU; ratios are raw bytes / compressed bytes "
            f"(higher is better); expcode-v1 and -v2 (= `lossless`) as stored in files ({CHUNK_TOKENS}-token chunks, "
            "code tables, repeat lists and segment directory included); bounds: exponent byte entropy-coded, "
            "sign/mantissa byte raw.\n\n"
            + table(ratios, {"MB": ".2f"}) + "\n\nC++ expcode-v2 speed (MB/s of raw KV, best of "
            f"{args.repeat}; `threads` per chunk):\n\n"
            + table(speeds, {"threads": "d", "encode MB/s": ".0f", "decode MB/s": ".0f"})
            + f"\n\n`kvfast.publish` (prefill + write, median of {3 * args.repeat}, alternating), lossless vs raw:\n\n"
            + table(publishes, {"raw s": ".3f", "lossless s": ".3f"}))
    if gpu is not None:
        body += "\n\nGPU:\n\n| | |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in gpu.items())
    print(body)
    if args.results is not None:
        write_section(args.results, SECTION, body, "bench_codec.py")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": ratios, "speed": speeds, "publish": publishes,
                                         "summary": gpu or {}}, indent=1))
    return 0


def gpu_only(args: argparse.Namespace) -> int:
    """--gpu-only: the GPU summary of Qwen3-0.6B's shape, printed and saved as --json's ``summary``."""
    if not torch.cuda.is_available():
        print("bench_codec --gpu-only: no CUDA device; nothing to measure")
        return 0
    model, doc, _ = model_kv("qwen3", args.layers, args.doc_tokens)
    gpu = gpu_summary(model, doc, args.repeat)
    print("\n".join(f"{k}: {v}" for k, v in gpu.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [], "speed": [], "publish": [], "summary": gpu}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
