"""Scatter throughput of the paged-cache kernels on a GPU: CUDA, Triton and the torch reference side by side,
against a plain device-to-device copy of the same bytes in the same run.

The case is the loader's: a 4096-token document of Qwen3-4B (36 layers, 8 KV heads, head_dim 128, bf16; 576 MiB
of K and V) sits in a device staging buffer ``[layers, 2, tokens, H, D]`` and goes into a paged cache whose
blocks come in random order. GB/s counts bytes read plus bytes written (2 x the KV bytes), as for the copy, so
"vs copy" is the fraction of what this GPU's memory system does for a straight copy.

Each kernel is run two ways: ``layers`` = one ``scatter_kv_layers`` launch for the whole chunk, ``per layer`` =
36 ``scatter_kv`` launches. Every result is checked bit for bit against the reference before it is timed.

Usage: python bench/bench_kernels.py [--tokens 4096] [--layouts NHD HND] [--json out.json]
Without a GPU it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

# Qwen3-4B's KV shape.
LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 36, 8, 128, torch.bfloat16
BLOCK_SIZE = 16


@dataclass
class Row:
    layout: str
    kernel: str
    launches: int
    ms: float  # median of the timed repeats
    gbps: float  # (bytes read + bytes written) / time
    vs_copy: float  # gbps / the d2d copy's gbps
    first_call_ms: float  # the first call alone (includes Triton's JIT compile)


# ===================================================================================================
# Timing
# ===================================================================================================
def time_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 3) -> list[float]:
    """Per-call milliseconds of ``fn``, measured with CUDA events on the current stream (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def first_call_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


# ===================================================================================================
# The case: staging chunk, paged cache, slots
# ===================================================================================================
def make_case(layout: str, tokens: int, layers: int, device: torch.device, seed: int = 0):
    """``(src [L, 2, T, H, D], storage [L, 2, num_blocks, *page], slot_mapping [T])`` on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    doc_blocks = -(-tokens // BLOCK_SIZE)
    num_blocks = 2 * doc_blocks  # the document's blocks are a random half of the cache, in random order
    page = (BLOCK_SIZE, KV_HEADS, HEAD_DIM) if layout == "NHD" else (KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    storage = torch.zeros(layers, 2, num_blocks, *page, dtype=DTYPE, device=device)
    src = torch.randn(layers, 2, tokens, KV_HEADS, HEAD_DIM, generator=gen).to(DTYPE).to(device)
    blocks = torch.randperm(num_blocks, generator=gen)[:doc_blocks]
    pos = torch.arange(tokens)
    slots = (blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE).to(device)
    return src, storage, slots


def torch_index_scatter(layout: str) -> Callable:
    """The fastest plain-torch scatter: one ``index_copy_`` (NHD) / ``index_put_`` (HND) for all layers."""
    def scatter(src: torch.Tensor, storage: torch.Tensor, slots: torch.Tensor) -> None:
        if layout == "NHD":  # [L, 2, nb * bs, H, D]: the slot is the row index
            storage.view(*storage.shape[:2], -1, KV_HEADS, HEAD_DIM).index_copy_(2, slots, src)
        else:  # [L, 2, nb, H, bs, D]: advanced indices (block, offset) around the head slice go first
            storage[:, :, slots // BLOCK_SIZE, :, slots % BLOCK_SIZE] = src.permute(2, 0, 1, 3, 4)
    return scatter


def per_layer(scatter_kv: Callable, layout: str) -> Callable:
    def scatter(src: torch.Tensor, storage: torch.Tensor, slots: torch.Tensor) -> None:
        for layer in range(src.shape[0]):
            scatter_kv(src[layer, 0], src[layer, 1], storage[layer, 0], storage[layer, 1], slots, layout=layout)
    return scatter


def candidates(layout: str, layers: int, device: torch.device) -> list[tuple[str, int, Callable]]:
    """``(name, launches, scatter(src, storage, slots))`` for every implementation importable here."""
    from kvfast.cache import ops

    out = []
    try:
        if device.type != "cuda":
            raise ImportError("the CUDA kernels need CUDA tensors")
        from kvfast.kernels import cuda as cuda_kernels

        out += [("cuda (layers)", 1, lambda s, c, m: cuda_kernels.scatter_kv_layers(s, c, m, layout=layout)),
                ("cuda (per layer)", layers, per_layer(cuda_kernels.scatter_kv, layout))]
    except ImportError as exc:
        print(f"# cuda kernels skipped: {exc}", file=sys.stderr)
    try:
        from kvfast.kernels import paged_kv as triton_kernels

        out += [("triton (layers)", 1, lambda s, c, m: triton_kernels.scatter_kv_layers(s, c, m, layout=layout)),
                ("triton (per layer)", layers, per_layer(triton_kernels.scatter_kv, layout))]
    except ImportError as exc:
        print(f"# triton kernels skipped: {exc}", file=sys.stderr)
    out += [("torch index_copy_" if layout == "NHD" else "torch index_put_", 1, torch_index_scatter(layout)),
            # index_put_ per layer and per K/V: what PagedKVCache.write did before the kernels
            ("torch ops reference", 2 * layers, lambda s, c, m: ops.scatter_kv_layers(s, c, m, layout=layout))]
    return out


# ===================================================================================================
# The run
# ===================================================================================================
def bench_layout(layout: str, tokens: int, layers: int, device: torch.device, repeats: int) -> list[Row]:
    from kvfast.cache import ops

    src, storage, slots = make_case(layout, tokens, layers, device)
    moved = 2 * src.numel() * src.element_size()  # read src + write the cache

    expected = storage.clone()
    ops.scatter_kv_layers(src, expected, slots, layout=layout)

    dst = torch.empty_like(src)
    copy_times = time_ms(lambda: dst.copy_(src), device, repeats)
    copy_ms = statistics.median(copy_times)
    copy_gbps = moved / copy_ms / 1e6
    rows = [Row(layout, "d2d copy (same bytes)", 1, copy_ms, copy_gbps, 1.0, copy_times[0])]
    del dst

    for name, launches, scatter in candidates(layout, layers, device):
        storage.zero_()
        first = first_call_ms(lambda: scatter(src, storage, slots), device)
        if not torch.equal(storage.view(torch.int16), expected.view(torch.int16)):
            raise AssertionError(f"{name} ({layout}) differs from the reference: not timing a wrong kernel")
        ms = statistics.median(time_ms(lambda: scatter(src, storage, slots), device, repeats))
        gbps = moved / ms / 1e6
        rows.append(Row(layout, name, launches, ms, gbps, gbps / copy_gbps, first))
    return rows


def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print(f"{'layout':6}  {'kernel':22}  {'launches':>8}  {'ms':>8}  {'GB/s':>8}  {'vs copy':>7}  {'1st call ms':>11}")
    for r in rows:
        print(f"{r.layout:6}  {r.kernel:22}  {r.launches:>8}  {r.ms:8.3f}  {r.gbps:8.1f}  {r.vs_copy:7.2f}  "
              f"{r.first_call_ms:11.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--layouts", nargs="+", default=["NHD", "HND"], choices=["NHD", "HND"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows as JSON here (for bench/RESULTS.md)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device, skipped (this benchmark measures GPU kernels)")
        return 0
    device = torch.device("cuda")

    rows = []
    for layout in args.layouts:
        rows += bench_layout(layout, args.tokens, args.layers, device, args.repeats)

    import kvfast._backend as backend

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    kv_mib = args.layers * 2 * args.tokens * KV_HEADS * HEAD_DIM * 2 / 2**20
    header = (f"kvfast scatter: {args.tokens} tokens x {args.layers} layers x {KV_HEADS} KV heads x {HEAD_DIM} bf16 "
              f"({kv_mib:.0f} MiB KV), block_size {BLOCK_SIZE}, random block order\n"
              f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton_version}, "
              f"kvfast default on cuda: {backend.paged_kernels(device)[0]}")
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
