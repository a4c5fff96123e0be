"""Load a Qwen3-0.6B-shaped document's KV into a paged cache on the CPU: kvfast against the bounds and the usual ways.

The document: 28 layers x 8 KV heads x head_dim 128, bfloat16, 4096 tokens (470 MB of K and V), chunks of 256
tokens, into a ``PagedKVCache`` (NHD, block_size 16) that is allocated once and reused (fresh memory faults in at
~1.7 GB/s and would swamp every number). The cases take turns, round robin, several rounds; the table shows
medians, in GB/s of KV bytes, and ratios against:

- hot (file in the page cache): the one-copy bound, ``numpy.copyto`` of as many bytes between two preallocated
  buffers, and ``safetensors.torch.load_file`` + ``index_copy_`` into the same cache;
- cold (the file's pages evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` before every run, nothing else
  dropped): a plain sequential ``readv`` of the whole file into one preallocated 8 MiB buffer.

Every case also reports the share of the CPUs other processes used while it ran: on a shared machine, numbers
taken while it is high are not worth much.

Run:
    python bench/bench_load.py                       # prints the table
    python bench/bench_load.py --results bench/RESULTS.md   # also writes the "## Load pipeline (CPU)" section
    python -m pytest bench --benchmark-only     # the headline cases under pytest-benchmark (test_headline.py)
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import kvfast
from kvfast._backend import native
from kvfast.bench import drop_page_cache, resident_fraction
from report import machine, write_section

LAYERS, HEADS, HEAD_DIM, TOKENS, DTYPE = 28, 8, 128, 4096, torch.bfloat16  # Qwen3-0.6B's KV, 4096 tokens
CHUNK_TOKENS, BLOCK_SIZE = 256, 16
FP = "sha256:" + "0b" * 32  # the document is random KV: any fingerprint will do
KV_BYTES = 2 * LAYERS * TOKENS * HEADS * HEAD_DIM * DTYPE.itemsize
SECTION = "## Load pipeline (CPU)"


# -- the document in three formats, and the cache ----------------------------------------------------------
@dataclass
class Fixture:
    folder: Path
    kvf: Path
    safetensors: Path
    torch_file: Path
    keys: list[torch.Tensor]  # [LAYERS] x [TOKENS, HEADS, HEAD_DIM]
    values: list[torch.Tensor]
    cache: kvfast.PagedKVCache
    src: np.ndarray  # [KV_BYTES] uint8: the bound's source
    dst: np.ndarray  # [KV_BYTES] uint8: the bound's destination
    read_buffer: bytearray  # 8 MiB: the sequential read's target


def make_fixture(folder: Path) -> Fixture:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(TOKENS, HEADS, HEAD_DIM, generator=g).to(DTYPE) for _ in range(LAYERS)]
    values = [torch.randn(TOKENS, HEADS, HEAD_DIM, generator=g).to(DTYPE) for _ in range(LAYERS)]
    ids = torch.randint(0, 151_936, (TOKENS,), generator=g)
    kvf = kvfast.save_kv(folder / "doc.kvf", keys, values, ids, fingerprint=FP, chunk_tokens=CHUNK_TOKENS)
    tensors = {f"{kv}.{layer}": t for layer in range(LAYERS) for kv, t in (("k", keys[layer]), ("v", values[layer]))}
    save_file(tensors, folder / "doc.safetensors")
    torch.save(tensors, folder / "doc.pt")
    # 4 spare blocks; torch.zeros has written every page, so no load pays for first-touch faults
    cache = kvfast.PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks=TOKENS // BLOCK_SIZE + 4, block_size=BLOCK_SIZE,
                                dtype=DTYPE, layout="NHD")
    src, dst = np.ones(KV_BYTES, np.uint8), np.zeros(KV_BYTES, np.uint8)
    return Fixture(folder, kvf, folder / "doc.safetensors", folder / "doc.pt", keys, values, cache, src, dst,
                   bytearray(8 << 20))


def evict(path: Path) -> None:
    """Drop this file's pages from the page cache (only this file's)."""
    drop_page_cache(path)


def warm(path: Path) -> None:
    """Read the file once, sequentially, into the page cache."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


# -- the cases: each a function that does one full load and cleans up after itself -------------------------
def scatter_index_copy(cache: kvfast.PagedKVCache, tensors: dict[str, torch.Tensor]) -> None:
    """Baselines' scatter: one ``index_copy_`` per layer and K/V into the NHD pages, then free the sequence."""
    seq = cache.new_sequence()
    slots = cache.append_slots(seq, TOKENS)
    for layer in range(LAYERS):
        for kv, pages in (("k", cache.key_cache(layer)), ("v", cache.value_cache(layer))):
            pages.view(-1, HEADS, HEAD_DIM).index_copy_(0, slots, tensors[f"{kv}.{layer}"])
    cache.free(seq)


def sequential_read(path: Path, buffer: bytearray) -> None:
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [view]):
            pass
    finally:
        os.close(fd)


def kvfast_load(fx: Fixture, **options) -> None:
    seq = kvfast.load(fx.kvf, fx.cache, fingerprint=FP, **options)
    fx.cache.free(seq)


def cases(fx: Fixture, cold: bool) -> list[tuple[str, Path | None, Callable[[], None]]]:
    """(label, file to evict first when cold, run)."""
    from safetensors.torch import load_file

    out: list[tuple[str, Path | None, Callable[[], None]]] = []
    if not cold:
        out.append(("bound: numpy.copyto", None, lambda: np.copyto(fx.dst, fx.src)))
    out.append(("sequential read of the .kvf", fx.kvf, lambda: sequential_read(fx.kvf, fx.read_buffer)))
    out.append(("safetensors load_file + index_copy_", fx.safetensors,
                lambda: scatter_index_copy(fx.cache, load_file(fx.safetensors))))
    out.append(("torch.load + index_copy_", fx.torch_file,
                lambda: scatter_index_copy(fx.cache, torch.load(fx.torch_file, weights_only=True))))
    out.append(("kvfast python", fx.kvf, lambda: kvfast_load(fx, backend="python")))
    if native is not None:
        for method in ("preadv", "mmap", "odirect"):
            for threads in (1, 2):
                for verify in (True, False):
                    label = f"kvfast native {method} t={threads}{'' if verify else ' verify=off'}"
                    out.append((label, fx.kvf, lambda m=method, t=threads, v=verify:
                                kvfast_load(fx, backend="native", method=m, threads=t, verify=v)))
    return out


def busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has run (user, nice, system, irq, softirq, steal), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def time_once(run: Callable[[], None], evict_path: Path | None) -> tuple[float, float]:
    """Seconds of one run (``evict_path`` evicted first: cold), and CPU seconds other processes used meanwhile.

    Cold means "not in this machine's page cache". The storage under a VM caches too (here a first read after
    other files were read runs at ~0.6-0.9 GB/s, a repeated one at ~3.4 GB/s, for every reader alike), so the
    file is read once before it is evicted: every cold run then starts from the same state below the VM.
    """
    if evict_path is not None:
        warm(evict_path)
        evict(evict_path)
    busy0, ours0 = busy_cpu_seconds(), sum(os.times()[:2])
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    return seconds, (busy_cpu_seconds() - busy0) - (sum(os.times()[:2]) - ours0)


def check_exact(fx: Fixture) -> None:
    """One native (or Python) load compared with the source tensors, bit for bit, on a few layers."""
    seq = kvfast.load(fx.kvf, fx.cache, fingerprint=FP)
    try:
        for layer in (0, LAYERS // 2, LAYERS - 1):
            k, v = fx.cache.gather(seq, layer)
            assert torch.equal(k.view(torch.int16), fx.keys[layer].view(torch.int16)), f"layer {layer} K differs"
            assert torch.equal(v.view(torch.int16), fx.values[layer].view(torch.int16)), f"layer {layer} V differs"
    finally:
        fx.cache.free(seq)


# -- the table ----------------------------------------------------------------------------------------------
def run_all(fx: Fixture, repeat: int) -> dict[str, list[tuple[str, float, float, float]]]:
    """{"hot"|"cold": [(label, median GB/s, median s, others' CPU share)]}.

    Cases take turns (round robin, ``repeat`` rounds after a warm-up round), so a slow spell of this shared
    machine falls on all of them alike instead of on whichever case happened to be running.
    """
    results = {}
    for mode in ("hot", "cold"):
        cold = mode == "cold"
        todo = cases(fx, cold)
        if not cold:
            # Hot means fully cached as one sequential read leaves a file (large folios). Pages that were evicted
            # and read back one by one (memory pressure, DAMON reclaim) make later reads of them slower, for
            # every reader alike, so all files start from that state.
            for path in {path for _, path, _ in todo if path is not None}:
                evict(path)
                warm(path)
        times: dict[str, list[float]] = {label: [] for label, _, _ in todo}
        others = dict.fromkeys(times, 0.0)
        for round_ in range(repeat + 1):  # round 0 warms up: imports, allocator, first faults
            for label, path, run in todo:
                seconds, other_cpu = time_once(run, path if cold else None)
                if round_ > 0:
                    times[label].append(seconds)
                    others[label] += other_cpu
        rows = []
        for label in times:
            seconds = statistics.median(times[label])
            share = max(0.0, others[label] / (sum(times[label]) * (os.cpu_count() or 1)))
            rows.append((label, KV_BYTES / seconds / 1e9, seconds, share))
            print(f"  {mode:4s} {label:42s} {rows[-1][1]:6.2f} GB/s  (others' CPU {share:.0%})", file=sys.stderr,
                  flush=True)
        results[mode] = rows
    return results


def table(results: dict[str, list[tuple[str, float, float, float]]]) -> str:
    lines = []
    for mode, rows in results.items():
        ref_label = "bound: numpy.copyto" if mode == "hot" else "sequential read of the .kvf"
        ref = next(row[1] for row in rows if row[0] == ref_label)
        st = next(row[1] for row in rows if row[0].startswith("safetensors"))
        ref_name = "x copyto" if mode == "hot" else "x seq read"
        lines += [f"{mode} page cache", "", f"| case | GB/s | ms | {ref_name} | x safetensors | others' CPU |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, gbps, seconds, others in rows:
            lines.append(f"| {label} | {gbps:.2f} | {seconds * 1e3:.1f} | {gbps / ref:.2f} | {gbps / st:.2f} | "
                         f"{others:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder "
                        "under /var/tmp, on disk: the cold numbers need a real filesystem, not tmpfs)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--results", type=Path, default=None, help="write the table into this RESULTS.md")
    args = parser.parse_args(argv)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="kvfast-bench-", dir="/var/tmp"))
    try:
        print(f"writing the document ({KV_BYTES / 1e6:.0f} MB of KV) to {folder} ...", file=sys.stderr)
        fx = make_fixture(folder)
        check_exact(fx)
        evict(fx.kvf)
        cold_ok = resident_fraction(fx.kvf)
        print(f"after eviction {'an unknown share' if cold_ok is None else f'{cold_ok:.0%}'} of the file is resident",
              file=sys.stderr)
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        host = machine(f"crc32c {kvfast.backend()['crc32c']}")
        results = run_all(fx, args.repeat)
        body = (f"{when}; {host}. `python bench/bench_load.py --repeat {args.repeat}`: medians of "
                f"{args.repeat} runs, GB/s of KV bytes ({KV_BYTES / 1e6:.0f} MB: {LAYERS} layers x {HEADS} KV heads x "
                f"{HEAD_DIM} x bf16 x {TOKENS} tokens; chunks of {CHUNK_TOKENS} tokens; NHD cache, block_size "
                f"{BLOCK_SIZE}). Cases take turns, round robin. Hot: each file evicted, then read once "
                f"sequentially, before the hot rounds. Cold: before each run the file is read once (so the VM's "
                f"storage has it cached, alike for every case) and then evicted from this machine's page cache "
                f"(resident after eviction: {cold_ok:.0%}). \"others' CPU\": the share of all CPUs other "
                f"processes used during the case's timed runs.\n\n"
                f"{table(results)}")
        print(body)
        if args.results is not None:
            write_section(args.results, SECTION, body, "bench_load.py")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
