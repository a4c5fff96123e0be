"""The provider-side store serving 64 agents one 4096-token document: attach times, memory, prefill saved.

A small Llama (random weights, fixed seed, float32 on the CPU) publishes a 4096-token document into a
``kvfast.Store`` once. Then 64 agents, each with its own 16-token question, attach the document into one
``PagedKVCache`` and prefill only their question (``kvfast.extend``). Reported:

- first attach: the document read from disk (its .kvf pages evicted from the page cache first: "cold", or
  left there: "hot"), from the store's host RAM tier, and later attaches, which find the document resident
  in the cache and only fork it (median of 63);
- memory: paged-cache blocks in use and process RSS with 1 agent and with 64 (against 64 private copies);
- prefill saved: per agent, a one-pass prefill of document + question (what an agent without the store runs)
  against attach + prefill of the question; times 64.

Run:
    python bench/bench_store.py                               # prints the table
    python bench/bench_store.py --results bench/RESULTS.md    # also writes the "## Store" section
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kvfast
from kvfast.hf.capture import prefill
from report import machine, write_section

SECTION = "## Store"
AGENTS, DOC_TOKENS, QUESTION_TOKENS, VOCAB = 64, 4096, 16, 4096


def make_model(layers: int, hidden: int, heads: int, kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2 * DOC_TOKENS)
    return LlamaForCausalLM(config).eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def evict_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(folder: Path, model: torch.nn.Module, repeat: int) -> list[tuple[str, str]]:
    doc = ids(DOC_TOKENS, 1)
    questions = [ids(QUESTION_TOKENS, 100 + i) for i in range(AGENTS)]
    mib = 1 << 20
    root = folder / "store"
    publish_s, entry = timed(lambda: kvfast.Store(root).publish(model, doc))
    n_params = sum(p.numel() for p in model.parameters())
    blocks_doc = -(-DOC_TOKENS // 16)
    block_bytes = entry.kv_bytes // DOC_TOKENS * 16

    def fresh_cache() -> kvfast.PagedKVCache:
        return kvfast.PagedKVCache.for_model(model, num_blocks=blocks_doc + 2 * AGENTS + 8)

    # first attach from disk, cold and hot page cache; from the RAM tier (fresh store objects and caches)
    cold, hot, ram = [], [], []
    for _ in range(repeat):
        evict_page_cache(entry.path)
        store, cache = kvfast.Store(root), fresh_cache()
        cold.append(timed(lambda: store.attach(model, doc + questions[0], cache))[0])
        store, cache = kvfast.Store(root), fresh_cache()
        t, (seq, _) = timed(lambda: store.attach(model, doc + questions[0], cache))
        hot.append(t)
        cache.free(seq)
        assert store.evict(cache) == blocks_doc  # the document moves to the host RAM tier
        t, (seq, _) = timed(lambda: store.attach(model, doc + questions[0], cache))
        ram.append(t)
        assert store.stats().hits["ram"] == 1
        store.close()
        del store, cache

    # 64 agents on one cache
    store, cache = kvfast.Store(root), fresh_cache()
    gc.collect()  # the earlier runs' caches go now, not in the middle of the measurement
    rss_empty = rss()
    first_s, (seq, n) = timed(lambda: store.attach(model, doc + questions[0], cache))
    agents, later = [(seq, n)], []
    blocks_1, rss_1 = cache.num_used_blocks, rss()
    for q in questions[1:]:
        t, got = timed(lambda q=q: store.attach(model, doc + q, cache))
        later.append(t)
        agents.append(got)
    blocks_64, rss_64 = cache.num_used_blocks, rss()
    extend_s = []
    for (seq, n), q in zip(agents, questions):
        extend_s.append(timed(lambda seq=seq, n=n, q=q: kvfast.extend(model, cache, seq, (doc + q)[n:]))[0])
    blocks_own = cache.num_used_blocks
    stats = store.stats()
    fingerprint_s = statistics.median(timed(lambda: kvfast.fingerprint(model))[0] for _ in range(20))
    assert all(n == DOC_TOKENS for _, n in agents) and stats.bytes_read["disk"] == entry.kv_bytes

    # the same agent without a store: one-pass prefill of document + question
    scratch = [timed(lambda: prefill(model, doc + questions[0]))[0] for _ in range(max(1, repeat // 2))]
    scratch_s = statistics.median(scratch)
    per_agent_store = statistics.median(later) + statistics.median(extend_s)
    med = statistics.median
    mem = lambda blocks: f"{blocks} blocks = {blocks * block_bytes / mib:.1f} MiB"  # noqa: E731
    saved_s = AGENTS * scratch_s - (first_s + sum(later) + sum(extend_s))
    return [
        ("document", f"{DOC_TOKENS} tokens, {entry.kv_bytes / mib:.0f} MiB of KV ({entry.num_layers} layers x "
                     f"{entry.num_kv_heads} KV heads x {entry.head_dim} x {entry.dtype}); model "
                     f"{n_params / 1e6:.1f} M parameters"),
        ("publish (prefill + write, once)", f"{publish_s:.2f} s"),
        ("first attach, disk tier, cold page cache", f"{med(cold) * 1e3:.1f} ms"),
        ("first attach, disk tier, hot page cache", f"{med(hot) * 1e3:.1f} ms"),
        ("attach from the host RAM tier", f"{med(ram) * 1e3:.1f} ms"),
        ("first attach in the 64-agent run (hot)", f"{first_s * 1e3:.1f} ms"),
        (f"later attaches (document resident; median of {AGENTS - 1})",
         f"{med(later) * 1e3:.2f} ms (max {max(later) * 1e3:.2f} ms)"),
        ("... of which the model's fingerprint check (kvfast.fingerprint)", f"{fingerprint_s * 1e3:.2f} ms"),
        ("paged-cache memory, 1 agent", mem(blocks_1)),
        (f"paged-cache memory, {AGENTS} agents after attach", mem(blocks_64)),
        (f"... after each prefilled its {QUESTION_TOKENS}-token question",
         f"{mem(blocks_own)} ({AGENTS} private copies would be {AGENTS * entry.kv_bytes / mib:.0f} MiB)"),
        ("process RSS: empty cache -> 1 agent -> 64 agents",
         f"{(rss_1 - rss_empty) / mib:+.1f} MiB -> {(rss_64 - rss_empty) / mib:+.1f} MiB"),
        ("per agent without the store: one-pass prefill of document + question", f"{scratch_s * 1e3:.0f} ms"),
        ("per agent with the store: later attach + prefill of the question",
         f"{per_agent_store * 1e3:.1f} ms ({scratch_s / per_agent_store:.0f}x less)"),
        (f"prefill time saved, {AGENTS} agents", f"{saved_s:.1f} s"),
        ("estimated prefill FLOPs saved (2 x params x tokens reused)",
         f"{stats.prefill_flops_saved:.3g} ({stats.tokens_reused} tokens)"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each first-attach case (median reported)")
    parser.add_argument("--dir", type=Path, default=None, help="store folder parent (default: a temp folder in "
                        "/var/tmp, on disk, so the cold case reads a real file system)")
    parser.add_argument("--results", type=Path, default=None, help="write the table into this RESULTS.md")
    args = parser.parse_args(argv)
    model = make_model(args.layers, args.hidden, args.heads, args.kv_heads)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="kvfast-bench-store-", dir="/var/tmp"))
    try:
        when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        head = f"{when}; {machine()}."
        rows = run(folder, model, args.repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    cmd = " ".join(["python bench/bench_store.py", *(argv if argv is not None else sys.argv[1:])])
    cmd = re.sub(r"\s*--results\s+\S+", "", cmd)
    body = (f"{head} `{cmd}`: a {args.layers}-layer Llama (hidden {args.hidden}, {args.heads} heads, "
            f"{args.kv_heads} KV heads, float32, random weights) publishes one {DOC_TOKENS}-token document into a "
            f"`kvfast.Store`; {AGENTS} agents attach it into one `PagedKVCache` (block_size 16) and prefill their "
            f"own {QUESTION_TOKENS}-token question with `kvfast.extend`.\n\n"
            "| | |\n|---|---:|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    print(body)
    if args.results is not None:
        write_section(args.results, SECTION, body, "bench_store.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
