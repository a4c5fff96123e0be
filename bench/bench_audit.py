"""Trust: signature verification speed, the hot store load with and without trusted keys, and what the audit
catches at what cost.

Models (CPU): the trained ``../shared/models/stories260K`` (when present) and random-weight Llama and Qwen3
configs (4 layers, hidden 256, GQA 8/2, fixed seeds), in bfloat16 (and float32 for the FP run). Documents are
random token ids. Audits against KV made by:

- honest publishers: eager or SDPA attention, 1 or 2 threads, the auditor using the other attention
  implementation and the other thread count (false positives; also calibrates the tolerances);
- a swap: the KV of "document + hidden instruction" (32 tokens spliced in at a random place) or of another
  document, under the claimed token ids;
- edits of f = 1% of positions: a steering vector added to K and V at every layer (norm = alpha x the layer's
  mean K/V norm), or one random exponent bit flipped in K or V at one random layer per edited position;
- another checkpoint: every weight times (1 + 1e-3 N(0, 1)), file claiming the original's fingerprint.

A "consistent forger" who recomputes everything after an edit from the edited prefix is caught only by a sample
*at* an edited position; its row is the measured fraction of audits whose sample positions hit the edited set.

The audit tables use full-depth samples alone (``layer0_samples=0``); ``--layer0`` measures the audit as
``kvfast.audit`` runs it by default, with 460 further positions whose layer 0 alone is recomputed.

Run:
    python bench/bench_audit.py                               # full run, prints the tables
    python bench/bench_audit.py --quick                       # small N (what tests/test_audit.py runs)
    python bench/bench_audit.py --layer0                      # only the audit with its layer-0 checks
    python bench/bench_audit.py --results bench/RESULTS.md    # also writes the "## Trust" section
    python bench/bench_audit.py --layer0 --results bench/RESULTS.md   # ... its "## Trust: the audit with ..." one
"""
from __future__ import annotations

import argparse
import datetime
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import kvfast
from kvfast.trust.audit import audit, layer0_flops
from kvfast.identity import model_config
from kvfast.hf.capture import capture_kv
from report import machine, write_section

SECTION = "## Trust"
LAYER0_SECTION = "## Trust: the audit with layer-0 checks"
STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
VOCAB = 512
INSTRUCTION_TOKENS = 32


# -- models and documents ----------------------------------------------------------------------------------
def models(dtype: torch.dtype) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, model) for every bench model, SDPA attention to start with."""
    from transformers import LlamaConfig, Qwen3Config

    from kvfast import configs

    if (STORIES / "model.safetensors").exists():
        yield "stories260K", configs.load_model(STORIES, dtype=dtype)
    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    yield "llama-rand", configs.build_model(LlamaConfig(**common), dtype=dtype, seed=0)
    yield "qwen3-rand", configs.build_model(Qwen3Config(head_dim=32, **common), dtype=dtype, seed=0)


def doc(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def make_kv(model: torch.nn.Module, ids: torch.Tensor, attn: str, threads: int) -> tuple[list, list]:
    """Per-layer K, V ``[N, H, D]`` of a prefill with this attention implementation and thread count."""
    before_attn, before_threads = model.config._attn_implementation, torch.get_num_threads()
    model.set_attn_implementation(attn)
    torch.set_num_threads(threads)
    try:
        return capture_kv(model, ids)
    finally:
        model.set_attn_implementation(before_attn)
        torch.set_num_threads(before_threads)


def save(path: Path, model: torch.nn.Module, ids: torch.Tensor, keys: list, values: list, attn: str) -> Path:
    """A .kvf claiming ``model``'s fingerprint and ``ids``, whatever ``keys``/``values`` really are."""
    return kvfast.save_kv(path, keys, values, ids, fingerprint=kvfast.fingerprint(model),
                          model_config=model_config(model),
                          metadata={"attn_implementation": attn, "prefill_chunk": "512"})


@dataclass
class Auditor:
    """Runs audits with the other attention implementation and thread count than the publisher's."""

    model: torch.nn.Module
    attn: str
    threads: int
    layer0_samples: int = 0  # the full-depth samples alone, unless an experiment asks for layer-0 checks too

    def __call__(self, path: Path, samples: int, secret: bytes | None = None, **kw) -> kvfast.AuditReport:
        kw.setdefault("layer0_samples", self.layer0_samples)
        before_attn, before_threads = self.model.config._attn_implementation, torch.get_num_threads()
        self.model.set_attn_implementation(self.attn)
        torch.set_num_threads(self.threads)
        try:
            return audit(self.model, path, samples=samples, secret=secret or secrets.token_bytes(16), **kw)
        finally:
            self.model.set_attn_implementation(before_attn)
            torch.set_num_threads(before_threads)


PUBLISHERS = (("eager", 1), ("sdpa", 2))  # the auditor runs the other one of each


def other(attn: str, threads: int) -> tuple[str, int]:
    return ("sdpa" if attn == "eager" else "eager"), (2 if threads == 1 else 1)


# -- perturbations ------------------------------------------------------------------------------------------
def edit_positions(n: int, fraction: float, rng: random.Random) -> list[int]:
    return sorted(rng.sample(range(n), max(1, round(fraction * n))))


def steer(keys: list, values: list, positions: list[int], alpha: float, rng: random.Random) -> tuple[list, list]:
    """Add alpha x (mean row norm) x a random unit direction (one per layer and K/V) at ``positions``."""
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    idx = torch.tensor(positions)
    out = []
    for tensors in (keys, values):
        edited = []
        for t in tensors:
            t = t.clone()
            rows = t.float().flatten(1)
            u = torch.randn(rows.shape[1], generator=g)
            u *= alpha * rows.norm(dim=1).mean() / u.norm()
            t[idx] = (rows[idx] + u).to(t.dtype).view(len(positions), *t.shape[1:])
            edited.append(t)
        out.append(edited)
    return out[0], out[1]


def flip_exponent_bits(keys: list, values: list, positions: list[int], rng: random.Random) -> tuple[list, list]:
    """One random exponent bit of one random element of K or V at one random layer, per position."""
    keys, values = [k.clone() for k in keys], [v.clone() for v in values]
    for p in positions:
        t = (keys if rng.random() < 0.5 else values)[rng.randrange(len(keys))]
        row = t[p].view(-1)
        bits = {torch.bfloat16: (7, 8), torch.float16: (10, 5), torch.float32: (23, 8)}[t.dtype]
        i, b = rng.randrange(row.numel()), bits[0] + rng.randrange(bits[1])
        raw = row.view(torch.int16 if t.element_size() == 2 else torch.int32)
        raw[i] ^= 1 << b  # b < the sign bit, so the mask fits the signed view
    return keys, values


# -- experiments --------------------------------------------------------------------------------------------
@dataclass
class Row:
    model: str
    case: str
    samples: int
    trials: int
    caught: int
    cost: float  # audit FLOPs / prefill FLOPs
    layer0: int = 0  # layer-0-only positions per audit

    @property
    def rate(self) -> float:
        return self.caught / self.trials


def honest(model, name, tmp: Path, n_tokens: int, docs: int, audits_per_file: int, samples: int,
           layer0_samples: int = 0) -> Row:
    """False positives: every (document, publisher) file audited ``audits_per_file`` times, other secrets."""
    caught = trials = 0
    costs = []
    for d in range(docs):
        ids = doc(n_tokens, 1000 + d)
        for attn, threads in PUBLISHERS:
            path = save(tmp / "honest.kvf", model, ids, *make_kv(model, ids, attn, threads), attn)
            auditor = Auditor(model, *other(attn, threads), layer0_samples)
            for _ in range(audits_per_file):
                r = auditor(path, samples)
                caught += not r.ok
                trials += 1
                costs.append(r.cost_fraction)
    return Row(name, f"honest ({n_tokens} tok)", samples, trials, caught, statistics.mean(costs), layer0_samples)


def swapped(model, name, tmp: Path, n_tokens: int, files: int, audits_per_file: int, samples: int,
            rng: random.Random) -> list[Row]:
    """KV of doc + hidden instruction (spliced in at a random place), and of another document."""
    rows = []
    for case in ("doc + hidden instruction", "another document"):
        caught = trials = 0
        for f in range(files):
            ids = doc(n_tokens, 2000 + f)
            if case == "another document":
                made_from = doc(n_tokens, 3000 + f)
            else:
                at = rng.randrange(n_tokens - INSTRUCTION_TOKENS + 1)
                instruction = doc(INSTRUCTION_TOKENS, 4000 + f)
                made_from = torch.cat([ids[:at], instruction, ids[at:]])[:n_tokens]
            path = save(tmp / "swap.kvf", model, ids, *make_kv(model, made_from, "sdpa", 2), "sdpa")
            auditor = Auditor(model, "eager", 1)
            for _ in range(audits_per_file):
                caught += not auditor(path, samples).ok
                trials += 1
        rows.append(Row(name, case, samples, trials, caught, float("nan")))
    return rows


def edited(model, name, tmp: Path, n_tokens: int, trials: int, samples_list: list[int], alphas: list[float],
           rng: random.Random, fraction: float = 0.01, layer0_samples: int = 0) -> list[Row]:
    """f = 1% of positions edited: steering at each alpha, exponent bit flips; per sample count."""
    ids = doc(n_tokens, 5000)
    keys, values = make_kv(model, ids, "sdpa", 2)
    auditor = Auditor(model, "eager", 1, layer0_samples)
    rows = []
    cases: list[tuple[str, Callable]] = [
        (f"steering alpha={a:g}", lambda pos, a=a: steer(keys, values, pos, a, rng)) for a in alphas]
    cases.append(("exponent bit flips", lambda pos: flip_exponent_bits(keys, values, pos, rng)))
    for case, make in cases:
        for samples in samples_list:
            caught = direct = 0
            costs = []
            for _ in range(trials):
                pos = edit_positions(n_tokens, fraction, rng)
                path = save(tmp / "edit.kvf", model, ids, *make(pos), "sdpa")
                r = auditor(path, samples)
                caught += not r.ok
                direct += bool(set(pos) & set(r.positions))
                costs.append(r.cost_fraction)
            cost = statistics.mean(costs)
            rows.append(Row(name, f"1% edited: {case}", samples, trials, caught, cost, layer0_samples))
            if case.startswith("exponent"):  # its edits in layers >= 1 only a full-depth sample on them can see
                rows.append(Row(name, "1% edited, consistent forger (a sample on an edit)", samples, trials,
                                direct, cost, layer0_samples))
    return rows


def other_checkpoint(model, name, tmp: Path, n_tokens: int, files: int, audits_per_file: int, samples: int,
                     rel: float = 1e-3) -> Row:
    """KV made by the same config with every weight times (1 + rel N(0,1)), claiming the original."""
    import copy

    caught = trials = 0
    for f in range(files):
        twin = copy.deepcopy(model)
        g = torch.Generator().manual_seed(6000 + f)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(1 + rel * torch.randn(p.shape, generator=g).to(p.dtype))
        ids = doc(n_tokens, 7000 + f)
        path = save(tmp / "twin.kvf", model, ids, *make_kv(twin, ids, "sdpa", 2), "sdpa")
        auditor = Auditor(model, "eager", 1)
        for _ in range(audits_per_file):
            caught += not auditor(path, samples).ok
            trials += 1
    return Row(name, f"another checkpoint (weights x (1 + {rel:g} N))", samples, trials, caught, float("nan"))


# -- signing speed and the hot store load -------------------------------------------------------------------
def signing_speed(tmp: Path, repeats: int) -> dict[str, float]:
    """GB/s of verify_signature on a 268 MB artifact (16 layers x 4096 tokens x 8 heads x 128, bf16)."""
    from kvfast.trust.signing import keygen, sign, verify_signature

    g = torch.Generator().manual_seed(0)
    layers, n, h, d = 16, 4096, 8, 128
    ks = [torch.randn(n, h, d, generator=g).to(torch.bfloat16) for _ in range(layers)]
    path = kvfast.save_kv(tmp / "big.kvf", ks, ks, list(range(n)), fingerprint="sha256:" + "ab" * 32)
    key, pub = keygen(tmp / "bench.key")
    sign(path, key)
    out = {"bytes": path.stat().st_size}
    for threads in (1, None):
        best = min(_timed(lambda: verify_signature(path, [pub], threads=threads)) for _ in range(repeats))
        out[f"GB/s ({threads or 'default'} threads)"] = out["bytes"] / best / 1e9
    return out


STORE_KINDS = ("before (no ledger, no keys)", "ledger", "ledger + trusted_keys (verified on ingest)")


def hot_load(tmp: Path, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of a store attach, per store kind: from disk (page cache hot) and a device-tier hit."""
    from transformers import LlamaConfig

    from kvfast import configs
    from kvfast.trust.signing import keygen, sign

    model = configs.build_model(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                                            max_position_embeddings=8192), dtype=torch.bfloat16, seed=0)
    ids = doc(4096, 1)
    path = kvfast.publish(model, ids, tmp / "hot.kvf")
    key, pub = keygen(tmp / "hot.key")
    sign(path, key)
    stores = {STORE_KINDS[0]: kvfast.Store(tmp / "before", ledger=False),
              STORE_KINDS[1]: kvfast.Store(tmp / "ledger"),
              STORE_KINDS[2]: kvfast.Store(tmp / "trusted", trusted_keys=[pub])}
    times: dict[str, dict[str, list[float]]] = {k: {"disk": [], "device": []} for k in stores}
    for s in stores.values():
        s.put(path)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=4096 // 16 + 8, block_size=16)
    prompt = ids.tolist() + [1]
    kinds = list(stores)
    for r in range(repeats):
        for kind in kinds[r % 3:] + kinds[: r % 3]:  # interleaved, order rotated: drift hits every kind alike
            s = stores[kind]
            for tier in ("disk", "device"):  # the first attach reads the .kvf, the second finds it resident
                t0 = time.perf_counter()
                seq, n = s.attach(model, prompt, cache)
                times[kind][tier].append(time.perf_counter() - t0)
                cache.free(seq)
            s.close()  # drop the resident root and the RAM tier: the next attach reads the file again
    return {k: {tier: statistics.median(v) for tier, v in t.items()} for k, t in times.items()}


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- report -------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    lines = ["| model | KV | samples | layer-0 samples | audits | caught | rate | audit FLOPs / prefill FLOPs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cost = "" if r.cost != r.cost else f"{100 * r.cost:.2f}%"
        lines.append(f"| {r.model} | {r.case} | {r.samples} | {r.layer0} | {r.trials} | {r.caught} | "
                     f"{100 * r.rate:.1f}% | {cost} |")
    return "\n".join(lines)


def layer0_checks(quick: bool, tmp: Path, rng: random.Random) -> str:
    """The audit with its default layer-0 checks (kvfast.trust.audit.DEFAULT_LAYER0_SAMPLES) beside 8, 40 or 48
    full-depth samples (40 or 48 + 460: <= 2% of prefill FLOPs on these models at 4096 tokens, stories260K's
    shape at 40): edits of 1% of positions (200 trials each: the point is >= 99%) and false positives."""
    from kvfast.trust.audit import DEFAULT_LAYER0_SAMPLES as n0

    rows: list[Row] = []
    n_long = 1024 if quick else 4096
    for dtype in (torch.float32, torch.bfloat16):
        for name, model in models(dtype):
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            for samples in (8,) if quick else (8, 48):
                rows.append(honest(model, label, tmp, 512, docs=1 if quick else 10, audits_per_file=5 if quick else 50,
                                   samples=samples, layer0_samples=n0))
            if dtype == torch.bfloat16:
                rows += edited(model, label, tmp, n_long, trials=10 if quick else 200,
                               samples_list=[8, 40] if quick else [8, 40, 48],
                               alphas=[0.01] if quick else [0.003, 0.01, 0.03, 0.1], rng=rng, layer0_samples=n0)
            print(table(rows), file=sys.stderr)
    return "\n\n".join([table(rows), smallest_caught(rows)])


def run(quick: bool, parts: frozenset[str] | set[str] = frozenset({"io", "audit"})) -> str:
    rng = random.Random(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        if "io" in parts:
            sig = signing_speed(tmp, repeats=1 if quick else 5)
            loads = hot_load(tmp, repeats=3 if quick else 101)
            out.append("Signature verification (SHA-256 of every byte + Ed25519), one 268 MB bf16 artifact, page "
                       "cache hot:\n\n| threads | GB/s |\n| --- | ---: |\n" + "\n".join(
                           f"| {k.split('(')[1].rstrip(')')} | {v:.2f} |" for k, v in sig.items() if k != "bytes"))
            base = loads[STORE_KINDS[0]]
            out.append("Store attach of a 4096-token document (8-layer Llama bf16, 16 MB), median of interleaved "
                       "runs; ratio to the store as it was before this work:\n\n"
                       "| store | from disk (page cache hot), ms | ratio | device-tier hit, ms | ratio |\n"
                       "| --- | ---: | ---: | ---: | ---: |\n" + "\n".join(
                           f"| {k} | {v['disk'] * 1e3:.2f} | {v['disk'] / base['disk']:.2f} | "
                           f"{v['device'] * 1e3:.3f} | {v['device'] / base['device']:.2f} |" for k, v in loads.items()))
        if "layer0" in parts:
            out.append(layer0_checks(quick, tmp, rng))
        if "audit" not in parts:
            return "\n\n".join(out)
        n_long = 1024 if quick else 4096
        rows: list[Row] = []
        for dtype in (torch.float32, torch.bfloat16):
            for name, model in models(dtype):
                label = f"{name} {str(dtype).removeprefix('torch.')}"
                for samples in (8,) if quick else (8, 32):
                    rows.append(honest(model, label, tmp, 256 if quick else 512, docs=2 if quick else 10,
                                       audits_per_file=5 if quick else 50, samples=samples))
                if dtype != torch.bfloat16:
                    continue
                rows += swapped(model, label, tmp, n_long, files=2 if quick else 10,
                                audits_per_file=5 if quick else 20, samples=8, rng=rng)
                rows.append(other_checkpoint(model, label, tmp, n_long, files=1 if quick else 3,
                                             audits_per_file=5 if quick else 30, samples=8))
                rows += edited(model, label, tmp, n_long, trials=10 if quick else 100,
                               samples_list=[8, 48] if quick else [8, 48, 460],
                               alphas=[1.0] if quick else [0.1, 0.25, 0.5, 1.0], rng=rng)
                print(table(rows), file=sys.stderr)
        out.append(table(rows))
        out.append(smallest_caught(rows))
    out.append(qwen3_4b_costs())
    return "\n\n".join(out)


def smallest_caught(rows: list[Row]) -> str:
    """Per model and sample count: the smallest steering alpha caught in >= 99% of the audits."""
    lines = ["Smallest steering norm caught >= 99% (alpha x the layer's mean K/V row norm, 1% of positions):", "",
             "| model | samples | layer-0 samples | smallest alpha caught >= 99% |", "| --- | ---: | ---: | ---: |"]
    best: dict[tuple[str, int, int], float] = {}
    for r in rows:
        if r.case.startswith("1% edited: steering") and r.rate >= 0.99:
            alpha = float(r.case.rsplit("=", 1)[1])
            key = (r.model, r.samples, r.layer0)
            best[key] = min(alpha, best.get(key, float("inf")))
    seen = sorted({(r.model, r.samples, r.layer0) for r in rows if r.case.startswith("1% edited: steering")})
    for model, samples, layer0 in seen:
        a = best.get((model, samples, layer0))
        lines.append(f"| {model} | {samples} | {layer0} | {'none of those tried' if a is None else f'{a:g}'} |")
    return "\n".join(lines)


def qwen3_4b_costs(tokens: int = 4096) -> str:
    """Audit FLOPs / prefill FLOPs for Qwen3-4B's shape (analytic, as kvfast.audit counts them)."""
    from kvfast import configs, cost

    shape = cost.ModelShape.from_config(configs.get_config("qwen3-4b"))
    prefill = cost.prefill_flops(shape, tokens)
    lines = [f"Audit cost for Qwen3-4B's shape, {tokens}-token document (analytic: linear + dense attention over "
             "the prefix, vs chunked prefill; layer-0 checks: layer 0's q/k/v projections per position):", "",
             "| samples | audit / prefill FLOPs | with 460 layer-0 checks |", "| ---: | ---: | ---: |"]
    layer0 = layer0_flops(shape, 460)
    for samples in (8, 40, 48, 80, 460):
        flops = cost.linear_flops(shape, samples) + cost.attention_flops(shape, samples, tokens - 1)
        lines.append(f"| {samples} | {100 * flops / prefill:.2f}% | {100 * (flops + layer0) / prefill:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N: a smoke run (tests run this)")
    ap.add_argument("--results", type=Path,
                    help=f"write the tables into this RESULTS.md under '{SECTION}' ('{LAYER0_SECTION}' with --layer0)")
    ap.add_argument("--io-only", action="store_true", help="only signature speed and store attach times")
    ap.add_argument("--layer0", action="store_true",
                    help="only the audit with its layer-0 checks (edits of 1%% of positions, false positives)")
    args = ap.parse_args()
    parts = {"io"} if args.io_only else {"layer0"} if args.layer0 else {"io", "audit"}
    body = run(args.quick, parts)
    print(body)
    if args.results:
        cmd = " ".join(["python bench/bench_audit.py", *(f"--{o}" for o in ("quick", "layer0") if getattr(args, o))])
        write_section(args.results, LAYER0_SECTION if args.layer0 else SECTION,
                      f"`{cmd}` ({datetime.date.today()}; {machine()}).\n\n{body}", "bench_audit.py")


if __name__ == "__main__":
    main()
