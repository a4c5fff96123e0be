"""``kvfast bench|cost``: prefill vs reuse, measured and modelled."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvfast.cli.common import (
    DEFAULT_PREFILL_CHUNK,
    DTYPE_BYTES,
    DTYPE_NAMES,
    EXIT_OK,
    fail,
    format_rows,
    positive_float,
    positive_int,
    probability_arg,
    progress_line,
    torch_dtype,
)


# -- kvfast bench / kvfast cost: prefill vs reuse, measured and modelled ---------------------------------
def _positive_ints(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"not a list of positive token counts: {text!r} (use e.g. 256,512,1024)")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from kvfast import bench, configs

    if args.plot:
        try:
            bench.require_matplotlib()
        except ImportError as exc:
            fail(str(exc))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = "no CUDA device here (torch.cuda.is_available() is False)"
        if args.skip_unavailable:
            print(f"kvfast bench: {msg}; skipped")
            return EXIT_OK
        fail(f"{msg}; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress_line(f"building {args.model}")
    try:
        model = configs.load_model(args.model, dtype=torch_dtype(args.dtype), device=device, seed=args.seed)
    except ValueError as exc:
        fail(str(exc))
    label = configs.named(args.model) or Path(args.model).name
    result = bench.run(model, args.lengths, label=label, question_tokens=args.question_tokens,
                       repeats=args.repeats, prefill_repeats=args.prefill_repeats, prefill_chunk=args.prefill_chunk,
                       cold=not args.no_cold, seed=args.seed, workdir=args.workdir, progress=not args.no_progress)
    payload = result.to_json()
    if args.save:
        Path(args.save).write_text(json.dumps(payload, indent=1) + "\n")
    if args.plot:
        bench.plot(result, args.plot)
    print(json.dumps(payload) if args.json else bench.format_table(result))
    return EXIT_OK


def add_bench_parser(sub: Any) -> None:
    """``kvfast bench MODEL --lengths ...``: measure prefill vs load+attach (kvfast.bench)."""
    sp = sub.add_parser("bench", help="measure prefill vs loading the .kvf, by document length",
                        description="For each length: the model's prefill of a random document, kvfast.load of "
                                    "its .kvf into a paged cache (page cache hot and dropped), the first-token "
                                    "latency of a question both ways, the ratio and the KV bytes. MODEL is a model "
                                    "folder (trained weights, or random ones from its config.json) or a named "
                                    "config (qwen3-0.6b, qwen3-4b) built with fixed-seed random weights.")
    sp.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model folder, config.json, or qwen3-0.6b / qwen3-4b")
    sp.add_argument("--lengths", type=_positive_ints, default=[256, 512, 1024, 2048, 4096],
                    help="document lengths in tokens (default 256,512,1024,2048,4096)")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and cache live")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="model and KV dtype (default bfloat16)")
    sp.add_argument("--question-tokens", type=positive_int, default=16,
                    help="question length for first-token latency (default 16)")
    sp.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each load (best taken; default 3)")
    sp.add_argument("--prefill-repeats", type=positive_int, default=2,
                    help="timed runs of each prefill (best taken; default 2)")
    sp.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK,
                    help=f"tokens per prefill forward (default {DEFAULT_PREFILL_CHUNK})")
    sp.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    sp.add_argument("--seed", type=int, default=0, help="seed of random weights and token ids")
    sp.add_argument("--no-cold", action="store_true", help="skip the loads with the file dropped from the page cache")
    sp.add_argument("--workdir", metavar="DIR", help="where the temporary .kvf files go (default: the temp dir)")
    sp.add_argument("--plot", metavar="PNG", help="draw time vs length and the ratio (needs matplotlib)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    sp.add_argument("--save", metavar="JSON", help="also write the JSON result to this file")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--skip-unavailable", action="store_true",
                    help="exit 0 with a message when --device cuda has no device (for bench/gpu_check.sh)")
    sp.set_defaults(func=cmd_bench)


def _dollars(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"${x / 1e6:,.2f}M"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:.3g}"


def _times(x: float | None) -> str:
    return "never" if x is None or x == float("inf") else f"{x:.3g}"


def _cost_rows(r: Any) -> list[tuple[str, Any]]:
    hw = r.hardware
    ms = lambda s: "-" if s is None else f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"  # noqa: E731
    rows = [
        ("source", r.source),
        ("hardware", f"{hw['name']}: {hw['peak_flops'] / 1e12:g} TFLOP/s x mfu {hw['mfu']:g}, "
                     f"{hw['memory_bytes_per_s'] / 1e12:g} TB/s memory, {hw['link_bytes_per_s'] / 1e9:g} GB/s link, "
                     f"${hw['dollars_per_hour']:g}/h"),
        ("KV bytes per token", f"{r.kv_bytes_per_token:,} B ({r.kv_bytes_per_token / 1e6:.4f} MB)"),
        ("KV bytes of the document", f"{r.kv_bytes:,} B ({r.kv_bytes / 1e9:.3f} GB)"),
        ("weight bytes per forward", f"{r.weight_bytes / 1e9:.2f} GB"),
        ("FLOPs: prefill doc + question", f"{r.prefill_flops / 1e12:.3f} TFLOP"),
        ("FLOPs: question after the doc", f"{r.question_flops / 1e12:.4f} TFLOP ({r.flops_ratio:.0f}x fewer)"),
        ("per agent: prefill", f"{ms(r.prefill_s)}  {_dollars(r.prefill_dollars)}"),
        ("per agent: load over the link", ms(r.load_s)),
        ("per agent: reuse (load + question)", f"{ms(r.reuse_s)}  {_dollars(r.reuse_dollars)}  "
                                               f"({r.saving:.3g}x cheaper)"),
        ("per agent: reuse, KV resident", f"{ms(r.reuse_resident_s)}  {_dollars(r.reuse_resident_dollars)}"
                                          + (f"  ({r.prefill_s / r.reuse_resident_s:.3g}x cheaper)"
                                             if r.reuse_resident_s else "")),
        ("per node: first fetch from origin", f"{ms(r.origin_fetch_s)} at {r.origin_bytes_per_s / 1e9:g} GB/s "
                                              f"= {r.origin_fetch_vs_prefill:.3g}x a prefill (once per node)"),
        ("per agent: egress of the KV", f"{_dollars(r.egress_dollars)} at ${r.egress_dollars_per_gb:g}/GB "
                                        f"= {r.egress_vs_prefill:.3g}x the prefill it saves"),
        ("break-even, hosted (loads)", _times(r.break_even_reuses)),
        ("break-even, shipped (loads)", _times(r.break_even_shipped)),
        (f"{r.agents:,.0f} agents: re-prefill", _dollars(r.total_reprefill_dollars)),
        (f"{r.agents:,.0f} agents: reuse, hosted", f"{_dollars(r.total_reuse_dollars)}  "
                                                   f"({r.total_reprefill_dollars / r.total_reuse_dollars:.3g}x less)"),
        (f"{r.agents:,.0f} agents: reuse, shipped", _dollars(r.total_shipped_dollars)),
        (f"tariff headroom ({r.cache_read_fraction:g}x cache read)", f"{r.tariff_headroom:.3g}x"
         + (f" (KV resident: {r.tariff_headroom_resident:.3g}x)" if r.tariff_headroom_resident else "")),
    ]
    return rows + [("note", n) for n in r.notes]


def cmd_cost(args: argparse.Namespace) -> int:
    from kvfast import configs, cost

    try:
        config = configs.get_config(args.model)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    shape = cost.ModelShape.from_config(config, name=configs.named(args.model) or Path(args.model).name)
    hw = cost.with_price(cost.HARDWARE[args.gpu], args.gpu_dollars_per_hour, args.mfu,
                         args.link_gb_per_s * 1e9 if args.link_gb_per_s else None)
    measured = None
    if args.measured:
        try:
            measured = cost.measured_times(json.loads(Path(args.measured).read_text()), args.tokens)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            fail(f"{args.measured}: not a usable kvfast bench --json result: {exc}")
        if measured.label != shape.name:  # another model's seconds would be priced as this one's
            fail(f"{args.measured}: measured on {measured.label or 'an unnamed model'}, not --model {args.model}; "
                  f"price it with --model {measured.label or '...'} or run kvfast bench {args.model}")
    report = cost.estimate(shape, args.tokens, agents=args.agents, hardware=hw, dtype_bytes=DTYPE_BYTES[args.dtype],
                           question_tokens=args.question_tokens, chunk=args.prefill_chunk,
                           egress_dollars_per_gb=args.egress_dollars_per_gb,
                           cache_read_fraction=args.cache_read_fraction, batch=args.batch, measured=measured,
                           origin_bytes_per_s=args.origin_gb_per_s * 1e9)
    if args.json:
        print(json.dumps(report.to_json()))
        return EXIT_OK
    print(f"kvfast cost: {shape.name}, {args.tokens}-token document, {args.question_tokens}-token question, "
          f"{DTYPE_BYTES[args.dtype]}-byte KV\n{format_rows(_cost_rows(report))}")
    return EXIT_OK


def add_cost_parser(sub: Any) -> None:
    """``kvfast cost --model M --tokens N --agents A``: prefill vs reuse in FLOPs, bytes and dollars (kvfast.cost)."""
    from kvfast.cost import (DEFAULT_CACHE_READ_FRACTION, DEFAULT_EGRESS_DOLLARS_PER_GB,  # torch-free
                             DEFAULT_ORIGIN_BYTES_PER_S, HARDWARE)

    sp = sub.add_parser("cost", help="model prefill vs reuse: FLOPs, KV bytes, dollars, break-even",
                        description="From first principles (a roofline over the model's matmul FLOPs and bytes) "
                                    "or from a kvfast bench result (--measured): KV bytes per token, prefill FLOPs, "
                                    "the reuse's cost, egress vs prefill per load, break-even reuse count, the "
                                    "total for N agents, and the headroom of a 0.1x cache-read tariff.")
    sp.add_argument("--model", required=True, help="named config (qwen3-0.6b, qwen3-4b), model folder or config.json")
    sp.add_argument("--tokens", type=positive_int, required=True, help="document tokens (>= 1)")
    sp.add_argument("--agents", type=positive_float, default=1.0, help="agents reading the document (e.g. 80e6)")
    sp.add_argument("--question-tokens", type=positive_int, default=16, help="question tokens (default 16)")
    sp.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16", help="KV and weight dtype (default bfloat16)")
    sp.add_argument("--gpu", choices=sorted(HARDWARE), default="h100", help="hardware preset (default h100)")
    sp.add_argument("--gpu-dollars-per-hour", type=positive_float, help="price of the accelerator (default $2.00/h)")
    sp.add_argument("--egress-dollars-per-gb", type=positive_float, default=DEFAULT_EGRESS_DOLLARS_PER_GB,
                    help=f"internet egress price (default ${DEFAULT_EGRESS_DOLLARS_PER_GB}/GB)")
    sp.add_argument("--mfu", type=probability_arg, help="fraction of peak FLOP/s a prefill achieves (default 0.5)")
    sp.add_argument("--link-gb-per-s", type=positive_float, help="host->device bandwidth of a KV load, GB/s")
    sp.add_argument("--batch", type=positive_int, default=1,
                    help="agents sharing each read of the weights (default 1)")
    sp.add_argument("--cache-read-fraction", type=probability_arg, default=DEFAULT_CACHE_READ_FRACTION,
                    help="cache-read price as a fraction of the input price (default 0.1)")
    sp.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK,
                    help=f"tokens per prefill forward (default {DEFAULT_PREFILL_CHUNK})")
    sp.add_argument("--measured", metavar="BENCH_JSON",
                    help="use the seconds of a kvfast bench --json result (of the same --model)")
    sp.add_argument("--origin-gb-per-s", type=float, default=DEFAULT_ORIGIN_BYTES_PER_S / 1e9,
                    help="a node's bandwidth from the S3-compatible origin, GB/s (default "
                         f"{DEFAULT_ORIGIN_BYTES_PER_S / 1e9:g}): the per-node read-through row")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.set_defaults(func=cmd_cost)
