"""Prefill vs reuse, measured: the model's own prefill of a document against loading its .kvf into a paged cache.

For each document length, in one run (``kvfast bench`` prints :func:`format_table` and draws :func:`plot`):

    prefill       the model's forward over the document, ``prefill_chunk`` tokens at a time (as publish does)
    load (hot)    ``kvfast.load`` of the same document's .kvf into a paged cache, file in the page cache:
                  header and manifest checks, fingerprint and dtype/shape checks, every chunk's CRC-32C,
                  block allocation, copy into the blocks
    load (cold)   the same after ``posix_fadvise(DONTNEED)`` dropped the file from the page cache (checked
                  with ``mincore``; ``None`` where the platform cannot drop it)
    1-copy floor  one ``preadv`` of the whole file into a warm buffer: what any load must at least do
    first token   a 16-token question both ways: prefill document + question, vs load + ``kvfast.extend``
                  with the question; the two first-token logits are compared as well

Each figure is the best of ``repeats`` runs (prefill: of ``prefill_repeats``), after one untimed warm-up:
on a shared machine slower runs measure the neighbours, not the code (the reasoning of ``timeit``).
``kvfast.load`` gets ``fingerprint=`` computed once before timing, as a serving stack that knows its model
would pass it; what ``model=`` would add per load (the cached fingerprint check) is measured and reported
as ``fingerprint_check_s``, the first full weight hash as ``fingerprint_first_s``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import mmap
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

import kvfast
from kvfast import cost
from kvfast.identity import model_config
from kvfast.format import dtype_name
from kvfast.hf.capture import DEFAULT_PREFILL_CHUNK, kv_from_cache, prefill

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096)
DEFAULT_QUESTION_TOKENS = 16
BLOCK_SIZE = 16


@dataclass
class BenchRow:
    """One document length. Seconds are the best of the repeats; ratios are prefill / load."""

    tokens: int
    kv_bytes: int  # K and V of the document (sum of the .kvf's chunk raw lengths)
    file_bytes: int
    prefill_s: float  # the document alone, chunked as publish does
    prefill_cpu_share: float | None  # CPU runs: CPU seconds / (wall x threads) of that prefill (< 0.8: contended)
    prefill_tflops: float  # FLOPs (kvfast.cost.prefill_flops) / prefill_s
    load_s: float  # kvfast.load, file hot in the page cache
    load_gbps: float  # kv_bytes / load_s / 1e9
    load_cold_s: float | None  # after dropping the file from the page cache; None where we cannot
    floor_s: float  # one preadv of the whole file into a warm buffer
    ratio: float  # prefill_s / load_s
    ratio_cold: float | None
    ttft_prefill_s: float  # first token: prefill of document + question
    ttft_reuse_s: float  # first token: load (hot) + the question's forward
    ttft_ratio: float
    first_token_match: bool  # same greedy first token both ways
    max_logit_diff: float  # max |logit difference| of that first token (the model's own rounding)
    # GPU runs only: where a provider keeps a hot document. Host RAM: the link bound is one pinned host->device
    # copy of kv_bytes (ratio_link = prefill_s / link_s, the best any load over that link can do; ``ratio`` is
    # the measured one). GPU memory (the store's device tier): a device-to-device copy of the resident
    # document's blocks into fresh ones (attach by sharing blocks, a fork, copies nothing and is faster still).
    link_s: float | None = None
    ratio_link: float | None = None
    device_copy_s: float | None = None
    ratio_device: float | None = None


@dataclass
class BenchResult:
    """A whole run: its rows and how they were measured (``to_json`` is what ``--json`` prints)."""

    rows: list[BenchRow]
    model: str
    device: str
    device_name: str
    dtype: str
    attn_implementation: str
    threads: int
    question_tokens: int
    prefill_chunk: int
    repeats: int
    prefill_repeats: int
    load_io: str  # kvfast.backend()["io"] for host caches, "python" for device caches
    fingerprint: str  # how kvfast.load was told the model
    fingerprint_first_s: float
    fingerprint_check_s: float
    cold: str  # how the cold rows were made, or why there are none
    date: str
    machine: str
    versions: dict[str, str]
    loadavg_start: list[float]
    loadavg_end: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        """Back from :meth:`to_json` (e.g. to plot a saved GPU run: ``plot(BenchResult.from_json(...), png)``)."""
        return cls(**{**data, "rows": [BenchRow(**r) for r in data["rows"]]})


# =====================================================================================================
# Page cache: drop a file, and check that it was dropped
# =====================================================================================================
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_fraction(path: str | os.PathLike) -> float | None:
    """Fraction of ``path``'s pages in the page cache (``mincore``), or None where it cannot be asked."""
    libc = _libc() if sys.platform.startswith("linux") else None
    size = os.path.getsize(path)
    if libc is None or size == 0:
        return None
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return float(np.frombuffer(vec, dtype=np.uint8).__and__(1).mean())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_page_cache(path: str | os.PathLike) -> float | None:
    """Evict ``path`` from the page cache (fsync, then ``posix_fadvise(DONTNEED)``); returns the fraction still
    resident afterwards (None where unknown). Raises ``OSError`` where ``posix_fadvise`` does not exist."""
    if not hasattr(os, "posix_fadvise"):
        raise OSError("os.posix_fadvise is not available on this platform")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


# =====================================================================================================
# Timing
# =====================================================================================================
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Best wall time over calls, and the CPU share of that best call: this process's CPU seconds over
    ``wall × torch threads`` (well under 1 on a CPU run means other processes took the cores)."""

    def __init__(self) -> None:
        self.best, self.cpu_share = float("inf"), float("nan")

    def __call__(self, fn: Callable[[], Any], device: torch.device, repeats: int, *,
                 before: Callable[[], None] | None = None, after: Callable[[Any], None] | None = None) -> Any:
        """Time ``repeats`` calls of ``fn`` and return the last result.

        ``before()`` runs untimed ahead of each call, ``after(result)`` untimed behind each but the last.
        """
        out = None
        for i in range(repeats):
            if before is not None:
                before()
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            _sync(device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if wall < self.best:
                self.best, self.cpu_share = wall, cpu / (wall * torch.get_num_threads())
            if after is not None and i < repeats - 1:
                after(out)
        return out


def _best(fn: Callable[[], Any], device: torch.device, repeats: int, **kwargs: Any) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls of ``fn`` (see :class:`_Timer`), and the last result."""
    timer = _Timer()
    out = timer(fn, device, repeats, **kwargs)
    return timer.best, out


@torch.no_grad()
def prefill_logits(model: Any, token_ids: Sequence[int], *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
                   ) -> torch.Tensor:
    """The first-token logits ``[vocab]`` of a from-scratch prefill of ``token_ids``, chunked as publish does."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=model.device)
    past = DynamicCache()
    for a in range(0, ids.numel(), prefill_chunk):
        logits = model(input_ids=ids[None, a : a + prefill_chunk], past_key_values=past, use_cache=True,
                       logits_to_keep=1).logits
    return logits[0, -1]


def _read_whole(path: Path, buf: np.ndarray) -> None:
    """One preadv of the file into ``buf`` (the 1-copy floor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done, n = 0, buf.nbytes
        while done < n:
            got = os.preadv(fd, [memoryview(buf)[done:]], done)
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)


# =====================================================================================================
# The run
# =====================================================================================================
def _machine(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device), f"{platform.system()} {platform.machine()}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{cpu} ({os.cpu_count()} cores{mem})", f"{platform.system()} {platform.release()} {platform.machine()}"


# Long on purpose: one run reads top to bottom, each measurement beside the baseline it is a ratio of.
def run(model: Any, lengths: Sequence[int] = DEFAULT_LENGTHS, *, label: str = "",
        question_tokens: int = DEFAULT_QUESTION_TOKENS, repeats: int = 3, prefill_repeats: int = 2,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cold: bool = True, seed: int = 0,
        workdir: str | os.PathLike | None = None, progress: bool = True) -> BenchResult:
    """Measure prefill vs reuse of ``model`` at each document length (see the module docstring).

    Args:
        model: a ``transformers`` causal LM in eval mode, on the device to measure.
        lengths: document lengths in tokens (random token ids, fixed seed).
        label: the model's name in the result (default: its architecture).
        question_tokens: the question's length for the first-token comparison.
        repeats: timed runs of each load (best taken); ``prefill_repeats`` for each prefill.
        prefill_chunk: tokens per forward of the prefill.
        cold: also time loads with the file dropped from the page cache.
        workdir: where the .kvf files go (default: a temporary folder, removed afterwards).
        progress: show a progress bar on stderr.

    Returns:
        A :class:`BenchResult`, one row per length, in the order given.
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError("lengths must be positive token counts")
    if question_tokens < 1 or repeats < 1 or prefill_repeats < 1:
        raise ValueError("question_tokens, repeats and prefill_repeats must be >= 1")
    device = model.device
    vocab = model.config.vocab_size
    shape = cost.ModelShape.from_config(model.config)
    device_name, machine = _machine(device)
    load_io = kvfast.backend()["io"] if device.type == "cpu" else kvfast.backend()["gpu_io"]
    import transformers

    result = BenchResult(
        rows=[], model=label or model_config(model)["architecture"], device=str(device), device_name=device_name,
        dtype=dtype_name(model.dtype), attn_implementation=str(model.config._attn_implementation),
        threads=torch.get_num_threads(), question_tokens=question_tokens, prefill_chunk=prefill_chunk,
        repeats=repeats, prefill_repeats=prefill_repeats, load_io=load_io, fingerprint="", fingerprint_first_s=0.0,
        fingerprint_check_s=0.0, cold="", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=machine, versions={"kvfast": kvfast.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__},
        loadavg_start=list(os.getloadavg()) if hasattr(os, "getloadavg") else [])

    steps = ["prefill", "save", "load", "cold load", "first token"]
    bar = tqdm(total=len(lengths) * len(steps) + 1, desc="kvfast bench", unit="step", disable=not progress,
               file=sys.stderr)
    bar.set_postfix_str("fingerprint + warm-up")
    t0 = time.perf_counter()
    fp = kvfast.fingerprint(model)
    result.fingerprint_first_s = time.perf_counter() - t0
    result.fingerprint_check_s, _ = _best(lambda: kvfast.fingerprint(model), torch.device("cpu"), max(3, repeats))
    result.fingerprint = "fingerprint= passed to kvfast.load (computed once before timing)"
    gen = torch.Generator().manual_seed(seed)
    question = torch.randint(0, vocab, (question_tokens,), generator=gen).tolist()
    prefill(model, torch.randint(0, vocab, (min(prefill_chunk, max(lengths)),), generator=gen).tolist(),
            prefill_chunk=prefill_chunk)  # warm-up: allocator, kernel selection
    bar.update()

    num_blocks = -(-(max(lengths) + question_tokens) // BLOCK_SIZE) + 2
    if device.type == "cuda":
        num_blocks *= 2  # the GPU-memory case holds a resident copy and makes a second one
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=BLOCK_SIZE)
    cold_notes: set[str] = set()
    can_drop = cold and hasattr(os, "posix_fadvise")
    if not cold:
        cold_notes.add("not measured (cold=False)")
    elif not can_drop:
        cold_notes.add("not measured: this platform has no posix_fadvise to drop a file from the page cache")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="kvfast-bench-") as tmp:
        for n in lengths:
            doc = torch.randint(0, vocab, (n,), generator=gen).tolist()
            path = Path(tmp) / f"doc{n}.kvf"

            bar.set_postfix_str(f"{n} tokens: prefill")
            timer = _Timer()
            past = timer(lambda: prefill(model, doc, prefill_chunk=prefill_chunk), device, prefill_repeats)
            prefill_s, prefill_cpu_share = timer.best, timer.cpu_share
            bar.update()

            bar.set_postfix_str(f"{n} tokens: save")
            keys, values = kv_from_cache(past)
            del past
            kvfast.save_kv(path, keys, values, doc, fingerprint=fp, model_config=model_config(model),
                           metadata={"prefill_chunk": str(prefill_chunk)})
            del keys, values
            with kvfast.open(path) as r:
                kv_bytes = sum(c.raw_length for c in r.chunks)
            file_bytes = path.stat().st_size
            bar.update()

            bar.set_postfix_str(f"{n} tokens: load")
            buf = np.ones(file_bytes, dtype=np.uint8)
            _read_whole(path, buf)  # warms the page cache and the buffer
            floor_s, _ = _best(functools.partial(_read_whole, path, buf), torch.device("cpu"), repeats)
            del buf

            def load() -> kvfast.KVSequence:
                return kvfast.load(path, cache, fingerprint=fp)

            cache.free(load())  # warm-up: touches the blocks this length uses
            load_s, seq = _best(load, device, repeats, after=cache.free)
            cache.free(seq)
            bar.update()

            bar.set_postfix_str(f"{n} tokens: cold load")
            load_cold_s = None
            if can_drop:
                resident: list[float] = []

                def drop() -> None:
                    frac = drop_page_cache(path)
                    if frac is not None:
                        resident.append(frac)

                load_cold_s, seq = _best(load, device, repeats, before=drop, after=cache.free)
                cache.free(seq)
                worst = max(resident) if resident else None
                if worst is None:
                    cold_notes.add("posix_fadvise(DONTNEED) after fsync before each load (residency not checkable)")
                elif worst > 0.01:
                    cold_notes.add(f"posix_fadvise(DONTNEED) before each load left up to {worst:.0%} of a file "
                                   "resident (mincore)")
                else:
                    cold_notes.add("posix_fadvise(DONTNEED) after fsync before each load; mincore: 0% resident")
                _read_whole_hot(path)
            bar.update()

            bar.set_postfix_str(f"{n} tokens: first token")
            ttft_prefill_s, logits_prefill = _best(
                lambda: prefill_logits(model, doc + question, prefill_chunk=prefill_chunk), device, prefill_repeats)

            def reuse() -> tuple[kvfast.KVSequence, torch.Tensor]:
                s = load()
                return s, kvfast.extend(model, cache, s, question, prefill_chunk=prefill_chunk)

            ttft_reuse_s, (seq, logits_reuse) = _best(reuse, device, repeats, after=lambda out: cache.free(out[0]))
            cache.free(seq)
            a, b = logits_prefill.float().cpu(), logits_reuse.float().cpu()
            link_s = device_copy_s = None
            if device.type == "cuda":
                link_s, device_copy_s = _gpu_tiers(cache, load, kv_bytes, n, device, repeats)
            bar.update()

            result.rows.append(BenchRow(
                tokens=n, kv_bytes=kv_bytes, file_bytes=file_bytes, prefill_s=prefill_s,
                prefill_cpu_share=prefill_cpu_share if device.type == "cpu" else None, prefill_tflops=cost.prefill_flops(shape, n, chunk=prefill_chunk) / prefill_s / 1e12,
                load_s=load_s, load_gbps=kv_bytes / load_s / 1e9, load_cold_s=load_cold_s, floor_s=floor_s,
                ratio=prefill_s / load_s, ratio_cold=prefill_s / load_cold_s if load_cold_s else None,
                ttft_prefill_s=ttft_prefill_s, ttft_reuse_s=ttft_reuse_s, ttft_ratio=ttft_prefill_s / ttft_reuse_s,
                first_token_match=bool(a.argmax() == b.argmax()), max_logit_diff=float((a - b).abs().max()),
                link_s=link_s, ratio_link=prefill_s / link_s if link_s else None, device_copy_s=device_copy_s,
                ratio_device=prefill_s / device_copy_s if device_copy_s else None))
            path.unlink()
    bar.close()
    result.cold = "; ".join(sorted(cold_notes))
    result.loadavg_end = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    return result


def _gpu_tiers(cache: kvfast.PagedKVCache, load: Callable[[], kvfast.KVSequence], kv_bytes: int, n: int,
               device: torch.device, repeats: int) -> tuple[float, float]:
    """(pinned host->device copy of kv_bytes, device copy of a resident document's n tokens into new blocks)."""
    pinned = torch.empty(kv_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(kv_bytes, dtype=torch.uint8, device=device)
    link_s, _ = _best(lambda: target.copy_(pinned, non_blocking=True), device, repeats)
    root = load()

    def copy() -> kvfast.KVSequence:
        seq = cache.new_sequence()
        cache.append_slots(seq, n)
        cache.storage[:, :, seq.block_table] = cache.storage[:, :, root.block_table]
        return seq

    device_copy_s, seq = _best(copy, device, repeats, after=cache.free)
    cache.free(seq)
    cache.free(root)
    return link_s, device_copy_s


def _read_whole_hot(path: Path) -> None:
    """Bring the file back into the page cache after the cold runs (the next steps time hot loads)."""
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# =====================================================================================================
# Output
# =====================================================================================================
def format_table(result: BenchResult) -> str:
    """The result as a fixed-width table with a few header lines."""
    head = (f"kvfast bench: {result.model}, {result.dtype}, {result.device} ({result.device_name}), "
            f"{result.threads} threads, attention {result.attn_implementation}, load io {result.load_io}\n"
            f"  {result.date}; best of {result.repeats} (prefill: of {result.prefill_repeats}); question "
            f"{result.question_tokens} tokens; prefill chunk {result.prefill_chunk}; load average "
            f"{' '.join(f'{x:.2f}' for x in result.loadavg_start)} at start\n"
            f"  {result.fingerprint}: first hash {result.fingerprint_first_s:.2f} s; kvfast.load(model=...) "
            f"would add the cached check, {result.fingerprint_check_s * 1e3:.1f} ms per load\n"
            f"  cold: {result.cold}")
    cols = ["tokens", "KV MB", "prefill s", "CPU %", "TFLOP/s", "load ms", "GB/s", "cold ms", "1-copy ms", "ratio",
            "cold ratio", "TTFT prefill s", "TTFT reuse ms", "TTFT ratio", "same token", "max|dlogit|"]
    lines = []
    for r in result.rows:
        lines.append([
            f"{r.tokens}", f"{r.kv_bytes / 1e6:.1f}", f"{r.prefill_s:.3f}",
            f"{r.prefill_cpu_share:.0%}" if r.prefill_cpu_share is not None else "-", f"{r.prefill_tflops:.2f}",
            f"{r.load_s * 1e3:.1f}", f"{r.load_gbps:.2f}",
            f"{r.load_cold_s * 1e3:.1f}" if r.load_cold_s is not None else "-", f"{r.floor_s * 1e3:.1f}",
            f"{r.ratio:.0f}x", f"{r.ratio_cold:.0f}x" if r.ratio_cold is not None else "-",
            f"{r.ttft_prefill_s:.3f}", f"{r.ttft_reuse_s * 1e3:.1f}", f"{r.ttft_ratio:.0f}x",
            "yes" if r.first_token_match else "NO", f"{r.max_logit_diff:.3g}"])
        if r.link_s is not None:
            lines[-1] += [f"{r.ratio_link:.1f}x", f"{r.ratio / r.ratio_link:.2f}", f"{r.ratio_device:.0f}x"]
    if any(r.link_s is not None for r in result.rows):
        cols += ["link-bound ratio", "x link bound", "GPU-memory ratio"]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = lambda row: "  ".join(v.rjust(w) for v, w in zip(row, widths))  # noqa: E731
    return "\n".join([head, fmt(cols), *(fmt(line) for line in lines)])


def require_matplotlib() -> None:
    """Raise ``ImportError`` with the fix when matplotlib is missing (checked before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'kvfast[plot]' (or pip install matplotlib)") from exc


def plot(result: BenchResult, path: str | os.PathLike) -> Path:
    """Draw time vs document length (prefill, load hot and cold; log axes) with the ratio on a second axis."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.tokens for r in result.rows]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot(x, [r.prefill_s for r in result.rows], "o-", color="tab:red", label="prefill (model forward)")
    ax.plot(x, [r.load_s for r in result.rows], "s-", color="tab:blue", label="kvfast.load, page cache hot")
    cold = [(r.tokens, r.load_cold_s) for r in result.rows if r.load_cold_s is not None]
    if cold:
        ax.plot(*zip(*cold), "s--", color="tab:cyan", label="kvfast.load, page cache dropped")
    ax.plot(x, [r.floor_s for r in result.rows], ":", color="gray", label="one preadv of the file (floor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [str(n) for n in x])
    ax.set_xlabel("document tokens")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [r.ratio for r in result.rows], "^-", color="tab:green", label="ratio prefill / load (hot)")
    ax2.set_ylabel("prefill / load", color="tab:green")
    ax2.set_ylim(0, max(r.ratio for r in result.rows) * 1.15)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(f"prefill vs reuse: {result.model}, {result.dtype}, {result.device_name}\n"
                 f"{result.threads} threads, {result.date[:10]}", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
