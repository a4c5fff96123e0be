"""Read a prompt's KV back out of an engine's pages, as a background save does: the native gather against the
PyTorch copy it replaced, and the one-copy bound, in one run.

The pages: vLLM CPU's ``vec`` layout at its block of 128 (per block and head, K stored transposed as ``[D, N]``,
then V as ``[N, D]``), a Qwen3-0.6B-shaped model (28 layers x 8 KV heads x head_dim 128, bfloat16), a 4096-token
prompt (470 MB of K and V) in shuffled blocks. Cases take turns, round robin; the table shows medians in GB/s of
KV bytes and the ratio to the bound (``numpy.copyto`` of as many bytes between two preallocated buffers).

Run:
    python bench/bench_gather.py                              # prints the table
    python bench/bench_gather.py --results bench/RESULTS.md   # also writes the "## Save gather" section
"""
from __future__ import annotations

import argparse
import datetime
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kvfast._backend import native
from kvfast.cache import ops
from kvfast.cache.pages import KVPages
from report import machine, write_section

SECTION = "## Save gather (vLLM CPU layout)"
LAYERS, HEADS, DIM, BLOCK = 28, 8, 128, 128


def vllm_cpu_pages(num_blocks: int, layers: int = LAYERS, heads: int = HEADS, dim: int = DIM) -> KVPages:
    """Per layer one ``[B, H, N, 2D]`` tensor, K's and V's views into it as vLLM's CPU backend lays them out."""
    g = torch.Generator().manual_seed(0)
    keys, values = [], []
    for _ in range(layers):
        plane = torch.randn(num_blocks, heads, BLOCK * 2 * dim, generator=g).to(torch.bfloat16)
        keys.append(plane[..., : BLOCK * dim].unflatten(-1, (dim, BLOCK)).transpose(2, 3))  # [B, H, N, D]
        values.append(plane[..., BLOCK * dim :].unflatten(-1, (BLOCK, dim)))
    return KVPages(keys, values, layout="HND")


def cases(pages: KVPages, table: list[int], tokens: int) -> dict[str, Callable[[], None]]:
    nbytes = 2 * LAYERS * tokens * HEADS * DIM * 2
    src, dst = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
    blocks = torch.tensor(table)

    def torch_copy(threads: int) -> Callable[[], None]:
        def run() -> None:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for layer in range(LAYERS):
                    ops.gather_kv(pages.keys[layer], pages.values[layer], blocks, tokens, layout="HND")
            finally:
                torch.set_num_threads(before)
        return run

    out = {"bound: numpy.copyto of as many bytes": lambda: np.copyto(dst, src)}
    if native is not None:
        out["kvfast: KVPages.gather (native, 1 thread)"] = lambda: [pages.gather(layer, table, tokens)
                                                                    for layer in range(LAYERS)]
    out[f"torch copy, {torch.get_num_threads()} threads (the save before)"] = torch_copy(torch.get_num_threads())
    out["torch copy, 1 thread"] = torch_copy(1)
    return out


def run(tokens: int, repeat: int) -> str:
    blocks = -(-tokens // BLOCK)
    pages = vllm_cpu_pages(blocks + 4)
    table = random.Random(0).sample(range(blocks + 4), blocks)
    want = [ops.gather_kv(pages.keys[layer], pages.values[layer], torch.tensor(table), tokens, layout="HND")
            for layer in range(LAYERS)]
    got = [pages.gather(layer, table, tokens) for layer in range(LAYERS)]
    assert all(torch.equal(a, b) for w, g in zip(want, got) for a, b in zip(w, g)), "the gather is not exact"
    del want, got
    todo = cases(pages, table, tokens)
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(repeat):
        for name, case in todo.items():
            t0 = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - t0)
    nbytes = 2 * LAYERS * tokens * HEADS * DIM * 2
    bound = statistics.median(times["bound: numpy.copyto of as many bytes"])
    lines = [f"{tokens} tokens, {nbytes / 1e6:.0f} MB of K and V, median of {repeat}:", "",
             "| case | ms | GB/s | time / bound |", "|---|---:|---:|---:|"]
    for name, ts in times.items():
        t = statistics.median(ts)
        lines.append(f"| {name} | {t * 1e3:.0f} | {nbytes / t / 1e9:.2f} | {t / bound:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--results", type=Path, help=f"write the table into this RESULTS.md under '{SECTION}'")
    args = ap.parse_args()
    body = run(args.tokens, args.repeat)
    print(body)
    if args.results:
        write_section(args.results, SECTION, f"`python bench/bench_gather.py` ({datetime.date.today()}; "
                      f"{machine()}).\n\n{body}", "bench_gather.py")


if __name__ == "__main__":
    main()
