"""The last table of bench/gpu_check.sh: each GPU benchmark's headline figure against its issue's target.

    python bench/gpu_summary.py OUT_DIR      # reads the JSON files the benchmarks saved there

A benchmark that did not run (or saved nothing) shows as "missing"; a figure is never invented.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def rows(out: Path) -> list[tuple[str, str, str]]:
    """(what, measured, target) rows."""
    found: list[tuple[str, str, str]] = []
    kernels = _load(out, "bench_kernels")
    if kernels is None:
        found.append(("scatter kernels", "missing", ">= 0.8 x d2d copy"))
    else:
        for layout in sorted({r["layout"] for r in kernels["rows"]}):
            best = max((r for r in kernels["rows"] if r["layout"] == layout and r["kernel"] != "d2d copy (same bytes)"),
                       key=lambda r: r["gbps"])
            found.append((f"scatter {layout}: {best['kernel']}", f"{best['gbps']:.0f} GB/s = {best['vs_copy']:.2f} x copy",
                          ">= 0.8 x d2d copy"))
    load = _load(out, "bench_load_gpu")
    if load is None:
        found.append(("file -> GPU paged cache", "missing", ">= 0.8 x pinned H2D"))
    else:
        best = max((r for r in load["rows"] if r["case"].startswith("kvfast native")), key=lambda r: r["GB/s"])
        found.append((f"file -> GPU cache: {best['case']}", f"{best['GB/s']:.1f} GB/s = {best['x bound']:.2f} x H2D",
                      ">= 0.8 x pinned H2D"))
    reuse = _load(out, "prefill_vs_reuse")
    if reuse is None:
        found.append(("prefill vs reuse", "missing", "host >= 0.8 x link bound; GPU memory >= 50x at 4096"))
    else:
        for r in reuse["rows"]:
            if r.get("ratio_link"):
                found.append((f"reuse {r['tokens']} tokens (host RAM / GPU memory)",
                              f"{r['ratio']:.1f}x = {r['ratio'] / r['ratio_link']:.2f} x link bound / "
                              f"{r['ratio_device']:.0f}x", "host >= 0.8 x link bound; GPU mem >= 50x at 4096"))
    codec = _load(out, "bench_codec_gpu")
    if codec is not None:  # written by the codec benchmark when it runs on a GPU
        for key, value in codec.get("summary", {}).items():
            found.append((f"codec: {key}", str(value), ""))
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    table = rows(Path(argv[0]))
    widths = [max(len(r[i]) for r in [("figure", "measured", "target"), *table]) for i in range(3)]
    for r in [("figure", "measured", "target"), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
