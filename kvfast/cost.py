"""Prefill vs reuse, modelled: FLOPs, bytes, seconds and dollars from a model config and a document length.

Pure functions (no torch, no I/O); ``kvfast cost`` prints :func:`estimate`. Notation used in every docstring:

    l  layers            d  hidden size        h  query heads       g  KV heads        e  head_dim
    f  MLP width         V  vocab size         b  bytes per KV / weight element (2 for bf16 and fp16)
    L  document tokens   q  question tokens    p  tokens already in the cache     c  prefill chunk (tokens)

What is counted: the matmuls (linear layers, attention scores and weighted sums, the LM head). Embedding
lookups, norms, rotary and softmax are O(L·d) and left out (< 0.1% of the total for the models here).
Attention is counted as executed by a dense kernel: a forward of ``q`` new tokens after ``p`` cached ones
computes all ``q × (p + q)`` scores, masked ones included; a causal kernel that skips masked tiles does up to
half of the diagonal block less (:func:`attention_flops` with ``causal_skip=True``).

Seconds come from a roofline: a forward takes ``max(FLOPs / (peak · mfu), bytes / memory bandwidth)``, and
moving the KV to the accelerator takes ``KV bytes / link bandwidth``. The hardware numbers in :data:`HARDWARE`
are public spec-sheet values; ``mfu`` (the fraction of peak a prefill achieves) is one assumption, 0.5 for
every preset, and is not fitted to any measurement. ``kvfast cost --measured bench.json`` replaces the
modelled seconds with ones ``kvfast bench`` measured.

Example (Qwen3-4B, the anchor paper's model and document):
    >>> s = ModelShape(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728,
    ...                vocab=151936)
    >>> kv_bytes_per_token(s, 2)      # 0.147 MB per token in fp16 / bf16
    147456
    >>> round(kv_bytes(s, 3774, 2) / 1e9, 3)
    0.556
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DEFAULT_PREFILL_CHUNK = 512  # = kvfast.hf.DEFAULT_PREFILL_CHUNK (not imported: this module stays torch-free)
DEFAULT_QUESTION_TOKENS = 16
DEFAULT_GPU_DOLLARS_PER_HOUR = 2.00  # an assumption: a rented H100-class GPU; pass your own price
# A node's read-through from an S3-compatible origin: one 10 Gbit/s NIC's worth; real S3 reaches it only with many
# parallel ranged GETs (bench/RESULTS.md "Origin" measures loopback, which is not a datacenter network).
DEFAULT_ORIGIN_BYTES_PER_S = 1.25e9
DEFAULT_EGRESS_DOLLARS_PER_GB = 0.09  # internet egress, first tier of the large clouds (and the paper's rate)
DEFAULT_CACHE_READ_FRACTION = 0.1  # providers' cache-read price as a fraction of the input-token price


# =====================================================================================================
# Shapes and hardware
# =====================================================================================================
@dataclass(frozen=True)
class ModelShape:
    """The config values that decide FLOPs and bytes (see the module docstring for the letters)."""

    layers: int  # l
    hidden: int  # d
    heads: int  # h
    kv_heads: int  # g
    head_dim: int  # e
    intermediate: int  # f
    vocab: int  # V
    mlp_matrices: int = 3  # gated MLP (gate, up, down), as in Llama, Qwen2/3, Mistral; a plain MLP has 2
    name: str = ""

    @classmethod
    def from_config(cls, config: Any, name: str = "") -> ModelShape:
        """From a ``transformers`` config (or any object with its attribute names)."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, intermediate=config.intermediate_size, vocab=config.vocab_size,
                   name=name or getattr(config, "model_type", ""))

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: ``d·e·(2h + 2g) + mlp_matrices·d·f`` (q, k, v, o; gate, up, down)."""
        d, e, h, g = self.hidden, self.head_dim, self.heads, self.kv_heads
        return d * e * (2 * h + 2 * g) + self.mlp_matrices * d * self.intermediate


@dataclass(frozen=True)
class Hardware:
    """One accelerator, by its spec sheet.

    Attributes:
        peak_flops: dense bf16/fp16 matmul FLOP/s (no sparsity).
        mfu: fraction of ``peak_flops`` a prefill achieves (an assumption, not a measurement).
        memory_bytes_per_s: HBM (or unified memory) bandwidth: bounds small forwards, which read all weights.
        link_bytes_per_s: how fast a KV load reaches the accelerator's memory (host -> device link).
        dollars_per_hour: the price of holding the accelerator.
    """

    name: str
    peak_flops: float
    mfu: float
    memory_bytes_per_s: float
    link_bytes_per_s: float
    dollars_per_hour: float = DEFAULT_GPU_DOLLARS_PER_HOUR
    note: str = ""


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("NVIDIA H100 SXM", 989e12, 0.5, 3.35e12, 50e9,
                     note="989 TFLOP/s dense bf16, 3.35 TB/s HBM3; PCIe Gen5 x16 host link, ~50 GB/s achieved "
                          "of 64 GB/s"),
    "h200": Hardware("NVIDIA H200 SXM", 989e12, 0.5, 4.8e12, 50e9,
                     note="989 TFLOP/s dense bf16, 4.8 TB/s HBM3e; PCIe Gen5 x16 host link"),
    "a100": Hardware("NVIDIA A100 SXM 80GB", 312e12, 0.5, 2.04e12, 25e9,
                     note="312 TFLOP/s dense bf16, 2.04 TB/s HBM2e; PCIe Gen4 x16 host link, ~25 GB/s"),
    "m1-pro": Hardware("Apple M1 Pro (16-core GPU)", 5.2e12, 0.5, 200e9, 200e9,
                       note="the anchor paper's machine: ~5.2 TFLOP/s GPU, 200 GB/s unified memory; a load is a "
                            "copy within that memory"),
}


# =====================================================================================================
# Bytes
# =====================================================================================================
def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """KV bytes one token adds to the cache: ``2 · l · g · e · b`` (K and V, every layer, every KV head).

    Example: Qwen3-4B in fp16: 2 · 36 · 8 · 128 · 2 = 147,456 B = 0.147 MB.
    """
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes


def kv_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """KV bytes of a ``tokens``-long document: ``L · 2 · l · g · e · b`` (= the .kvf's chunk raw lengths)."""
    return tokens * kv_bytes_per_token(shape, dtype_bytes)


def weight_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Weight bytes one forward reads: ``b · (l · layer_params + V · d)`` (layers, then the LM head).

    The embedding table is only gathered (one row per token), so only the LM head's ``V · d`` is read whole
    (tied or not).
    """
    return dtype_bytes * (shape.layers * shape.layer_params + shape.vocab * shape.hidden)


# =====================================================================================================
# FLOPs
# =====================================================================================================
def linear_flops(shape: ModelShape, tokens: int) -> int:
    """Linear layers over ``tokens`` tokens: ``2 · L · l · (d·e·(2h + 2g) + 3·d·f)`` (2 FLOPs per multiply-add)."""
    return 2 * tokens * shape.layers * shape.layer_params


def attention_flops(shape: ModelShape, new_tokens: int, past: int = 0, *, causal_skip: bool = False) -> int:
    """Attention matmuls of one forward of ``q = new_tokens`` after ``p = past`` cached tokens.

    Dense (what SDPA and eager attention execute): ``4 · l · h · e · q · (p + q)`` (scores QKᵀ and the weighted
    sum AV, each ``2 · h · e`` per (query, key) pair). With ``causal_skip``: only the unmasked pairs,
    ``4 · l · h · e · (q · p + q · (q + 1) / 2)``. Summed over a whole document the dense count is the L² term
    of prefill.
    """
    q, p = new_tokens, past
    pairs = q * p + (q * (q + 1)) // 2 if causal_skip else q * (p + q)
    return 4 * shape.layers * shape.heads * shape.head_dim * pairs


def lm_head_flops(shape: ModelShape, rows: int = 1) -> int:
    """The LM head over ``rows`` positions: ``2 · d · V · rows`` (kvfast keeps one row per forward)."""
    return 2 * shape.hidden * shape.vocab * rows


def forward_flops(shape: ModelShape, new_tokens: int, past: int = 0, *, causal_skip: bool = False,
                  logits_rows: int = 1) -> int:
    """One forward of ``q`` tokens after ``p``: linear + attention + LM head (``logits_rows`` rows)."""
    return (linear_flops(shape, new_tokens) + attention_flops(shape, new_tokens, past, causal_skip=causal_skip)
            + lm_head_flops(shape, logits_rows))


def chunks(tokens: int, chunk: int, past: int = 0) -> list[tuple[int, int]]:
    """``(new_tokens, past)`` of each forward when ``tokens`` are prefilled ``chunk`` at a time after ``past``."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    return [(min(chunk, tokens - a), past + a) for a in range(0, tokens, chunk)]


def prefill_flops(shape: ModelShape, tokens: int, *, chunk: int = DEFAULT_PREFILL_CHUNK, past: int = 0,
                  causal_skip: bool = False, all_logits: bool = False) -> int:
    """FLOPs of prefilling ``L = tokens`` tokens in chunks of ``c`` (as :func:`kvfast.publish` does).

    ``Σ_chunks [linear(q_i) + attention(q_i, p_i) + lm_head]`` with ``q_i = min(c, L - i·c)``, ``p_i = past + i·c``:

        = 2·L·l·(d·e·(2h+2g) + 3·d·f)                  linear, linear in L
        + 4·l·h·e · Σ_i q_i·(p_i + q_i)                 attention, ≈ 2·l·h·e·L² for L ≫ c (the L² term)
        + 2·d·V · ⌈L/c⌉                                 LM head, one row per chunk (all L rows if ``all_logits``)

    Example: Qwen3-4B, 3774 tokens, c = 512: 27.4 TFLOP linear + 4.8 TFLOP attention + 0.006 TFLOP head.
    """
    total = 0
    for q, p in chunks(tokens, chunk, past):
        total += forward_flops(shape, q, p, causal_skip=causal_skip, logits_rows=q if all_logits else 1)
    return total


# =====================================================================================================
# Seconds (a roofline)
# =====================================================================================================
def forward_seconds(shape: ModelShape, hw: Hardware, new_tokens: int, past: int, dtype_bytes: int, *,
                    batch: int = 1) -> float:
    """One agent's share of a forward: ``max(FLOPs / (peak · mfu), (weights / batch + KV) / memory bandwidth)``.

    ``batch`` agents whose forwards run together share one read of the weights; each reads its own KV
    (``p + q`` tokens). With ``batch = 1`` (one request, first-token latency) a short forward is bound by
    reading the weights: for Qwen3-4B on an H100, 8.0 GB / 3.35 TB/s = 2.4 ms, whatever ``q`` is.
    """
    flops = forward_flops(shape, new_tokens, past)
    moved = weight_bytes(shape, dtype_bytes) / batch + kv_bytes(shape, past + new_tokens, dtype_bytes)
    return max(flops / (hw.peak_flops * hw.mfu), moved / hw.memory_bytes_per_s)


def prefill_seconds(shape: ModelShape, hw: Hardware, tokens: int, dtype_bytes: int, *,
                    chunk: int = DEFAULT_PREFILL_CHUNK, past: int = 0, batch: int = 1) -> float:
    """Sum of :func:`forward_seconds` over the chunks of a prefill."""
    return sum(forward_seconds(shape, hw, q, p, dtype_bytes, batch=batch) for q, p in chunks(tokens, chunk, past))


def load_seconds(nbytes: float, hw: Hardware) -> float:
    """Moving a document's KV to the accelerator: ``bytes / link bandwidth``."""
    return nbytes / hw.link_bytes_per_s


# =====================================================================================================
# Dollars
# =====================================================================================================
def gpu_dollars(seconds: float, dollars_per_hour: float) -> float:
    """``seconds · $/h / 3600``: the price of holding the accelerator that long."""
    return seconds * dollars_per_hour / 3600.0


def egress_dollars(nbytes: float, dollars_per_gb: float) -> float:
    """Shipping ``nbytes`` over the internet: ``bytes / 1e9 · $/GB`` (decimal GB, as clouds bill)."""
    return nbytes / 1e9 * dollars_per_gb


def break_even_reuses(publish_cost: float, prefill_cost: float, reuse_cost: float) -> float:
    """Loads after which publishing once has paid for itself: ``n* = publish / (prefill − reuse)``.

    Serving ``n`` readers costs ``n · prefill`` by re-prefill and ``publish + n · reuse`` by reuse; the two meet
    at ``n*``. ``inf`` when a reuse costs at least a prefill (it never pays). With ``reuse ≪ prefill`` and
    ``publish ≈ prefill``, ``n* ≈ 1``: one reuse pays for the publish.
    """
    saving = prefill_cost - reuse_cost
    return publish_cost / saving if saving > 0 else math.inf


def serve_cost(agents: float, per_agent: float, publish_cost: float = 0.0) -> float:
    """Total cost of ``agents`` readers: ``publish + agents · per_agent``."""
    return publish_cost + agents * per_agent


def tariff_headroom(prefill_cost: float, reuse_cost: float,
                    cache_read_fraction: float = DEFAULT_CACHE_READ_FRACTION) -> float:
    """How many times a cache-read price of ``fraction × prefill price`` covers the reuse's cost.

    ``headroom = fraction · prefill / reuse = fraction · saving``. Above 1 a provider that prices cache reads at
    0.1× of input tokens still earns its prefill margin on them; below 1 the discount is sold under cost.
    """
    return cache_read_fraction * prefill_cost / reuse_cost if reuse_cost > 0 else math.inf


# =====================================================================================================
# Measured seconds (a kvfast bench result)
# =====================================================================================================
@dataclass(frozen=True)
class MeasuredTimes:
    """Seconds for one document length, read (or interpolated) from a ``kvfast bench --json`` result."""

    publish_s: float  # prefill of the document alone
    prefill_s: float  # first token by prefill of document + question
    reuse_s: float  # first token by load + the question's forward
    how: str  # "measured", "interpolated" or "extrapolated", with the lengths used
    label: str = ""


def measured_times(bench: Mapping[str, Any], tokens: int) -> MeasuredTimes:
    """The bench row for ``tokens``, or a power-law (log-log linear) fit through the two nearest rows.

    Args:
        bench: the object ``kvfast bench --json`` prints: ``{"rows": [{"tokens", "prefill_s",
            "ttft_prefill_s", "ttft_reuse_s", ...}], "model": ...}``.
        tokens: the document length to price.
    """
    rows = sorted(bench.get("rows", []), key=lambda r: r["tokens"])
    if not rows:
        raise ValueError("the bench result has no rows")
    keys = ("prefill_s", "ttft_prefill_s", "ttft_reuse_s")
    for r in rows:
        missing = [k for k in ("tokens", *keys) if not isinstance(r.get(k), (int, float))]
        if missing:
            raise ValueError(f"bench row {r.get('tokens')} lacks {', '.join(missing)} (is it a kvfast bench "
                             "--json result?)")
    label = str(bench.get("model", ""))
    exact = [r for r in rows if r["tokens"] == tokens]
    if exact:
        r = exact[0]
        return MeasuredTimes(r["prefill_s"], r["ttft_prefill_s"], r["ttft_reuse_s"],
                             f"measured at {tokens} tokens", label)
    if len(rows) == 1:
        raise ValueError(f"the bench result has one row ({rows[0]['tokens']} tokens); it cannot be stretched to "
                         f"{tokens} tokens: run kvfast bench with --lengths including {tokens}")
    below = [r for r in rows if r["tokens"] < tokens]
    above = [r for r in rows if r["tokens"] > tokens]
    if below and above:
        a, b, how = below[-1], above[0], "interpolated"
    elif above:
        a, b, how = rows[0], rows[1], "extrapolated"
    else:
        a, b, how = rows[-2], rows[-1], "extrapolated"
    t = math.log(tokens / a["tokens"]) / math.log(b["tokens"] / a["tokens"])
    fit = [math.exp(math.log(a[k]) + t * (math.log(b[k]) - math.log(a[k]))) for k in keys]
    return MeasuredTimes(*fit, f"{how} (log-log) from {a['tokens']} and {b['tokens']} tokens", label)


# =====================================================================================================
# The whole estimate
# =====================================================================================================
@dataclass
class CostReport:
    """Everything ``kvfast cost`` prints, per load unless named ``total_``. Seconds and dollars are per agent."""

    model: str
    tokens: int
    question_tokens: int
    agents: float
    dtype_bytes: int
    hardware: dict[str, Any]
    source: str  # "first principles (roofline)" or the measured file and how its row was found
    egress_dollars_per_gb: float
    cache_read_fraction: float
    # bytes
    kv_bytes_per_token: int
    kv_bytes: int
    weight_bytes: int
    # FLOPs
    publish_flops: int  # prefill of the document (chunked)
    prefill_flops: int  # prefill of document + question, per agent without reuse
    question_flops: int  # the question's forward after the loaded document
    flops_ratio: float  # prefill_flops / question_flops
    # seconds
    publish_s: float
    prefill_s: float
    load_s: float | None  # KV over the link (None when measured: inside reuse_s)
    reuse_s: float  # load + the question's forward
    reuse_resident_s: float | None  # KV already in accelerator memory: the question's forward only
    # dollars
    prefill_dollars: float
    reuse_dollars: float
    reuse_resident_dollars: float | None
    egress_dollars: float
    egress_vs_prefill: float  # egress per load / the prefill cost it saves
    saving: float  # prefill / reuse (hosted next to the accelerator, no egress)
    break_even_reuses: float  # hosted
    break_even_shipped: float  # when every load also pays egress (inf: never)
    total_reprefill_dollars: float
    total_reuse_dollars: float  # publish + agents · reuse (hosted)
    total_shipped_dollars: float  # publish + agents · (reuse + egress)
    tariff_headroom: float  # hosted, KV over the link
    tariff_headroom_resident: float | None  # KV resident in accelerator memory
    batch: int = 1
    notes: list[str] = field(default_factory=list)
    # a node's first load of the document, read through from the origin (once per node, not per agent)
    origin_bytes_per_s: float = DEFAULT_ORIGIN_BYTES_PER_S
    origin_fetch_s: float = 0.0  # KV bytes / origin bandwidth
    origin_fetch_vs_prefill: float = 0.0  # that fetch / one prefill of the document with the question

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``inf`` becomes ``null``)."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


def estimate(shape: ModelShape, tokens: int, *, agents: float = 1.0, hardware: Hardware = HARDWARE["h100"],
             dtype_bytes: int = 2, question_tokens: int = DEFAULT_QUESTION_TOKENS,
             chunk: int = DEFAULT_PREFILL_CHUNK, egress_dollars_per_gb: float = DEFAULT_EGRESS_DOLLARS_PER_GB,
             cache_read_fraction: float = DEFAULT_CACHE_READ_FRACTION, batch: int = 1,
             measured: MeasuredTimes | None = None,
             origin_bytes_per_s: float = DEFAULT_ORIGIN_BYTES_PER_S) -> CostReport:
    """Prefill vs reuse for one document read by ``agents`` agents, each asking a ``question_tokens`` question.

    Per agent, without reuse: prefill document + question (:func:`prefill_seconds`). With reuse: load the KV
    (:func:`load_seconds`) and run the question's forward after it (:func:`forward_seconds`); the publisher
    pays one prefill of the document. ``batch`` agents share each read of the weights (:func:`forward_seconds`).
    The load and the question's forward are added, not overlapped (a layer-major load lets them overlap: the
    real figure lies between the sum and the larger of the two). ``measured`` replaces the modelled times with
    measured ones.
    """
    if tokens < 1 or question_tokens < 1 or batch < 1:
        raise ValueError("tokens, question_tokens and batch must be >= 1")
    hw = hardware
    kvb = kv_bytes(shape, tokens, dtype_bytes)
    publish_flops = prefill_flops(shape, tokens, chunk=chunk)
    prefill_q_flops = prefill_flops(shape, tokens + question_tokens, chunk=chunk)
    question_flops = prefill_flops(shape, question_tokens, chunk=chunk, past=tokens)
    notes: list[str] = []
    if measured is None:
        source = f"first principles (roofline on {hw.name}, mfu {hw.mfu:g}, batch {batch})"
        publish_s = prefill_seconds(shape, hw, tokens, dtype_bytes, chunk=chunk, batch=batch)
        prefill_s = prefill_seconds(shape, hw, tokens + question_tokens, dtype_bytes, chunk=chunk, batch=batch)
        question_s = prefill_seconds(shape, hw, question_tokens, dtype_bytes, chunk=chunk, past=tokens, batch=batch)
        if batch > 1:
            notes.append(f"{batch} agents share each read of the weights")
        load_s: float | None = load_seconds(kvb, hw)
        reuse_s = load_s + question_s
        resident_s: float | None = question_s
    else:
        source = f"measured: {measured.label or 'bench result'}, {measured.how}"
        publish_s, prefill_s, reuse_s = measured.publish_s, measured.prefill_s, measured.reuse_s
        load_s = resident_s = None
        notes.append("seconds measured by kvfast bench; FLOPs and bytes from the config")
    rate = hw.dollars_per_hour
    prefill_d, reuse_d, publish_d = (gpu_dollars(s, rate) for s in (prefill_s, reuse_s, publish_s))
    resident_d = gpu_dollars(resident_s, rate) if resident_s is not None else None
    egress_d = egress_dollars(kvb, egress_dollars_per_gb)
    return CostReport(
        model=shape.name, tokens=tokens, question_tokens=question_tokens, agents=agents, dtype_bytes=dtype_bytes,
        hardware=asdict(hw), source=source, egress_dollars_per_gb=egress_dollars_per_gb,
        cache_read_fraction=cache_read_fraction,
        kv_bytes_per_token=kv_bytes_per_token(shape, dtype_bytes), kv_bytes=kvb,
        weight_bytes=weight_bytes(shape, dtype_bytes),
        publish_flops=publish_flops, prefill_flops=prefill_q_flops, question_flops=question_flops,
        flops_ratio=prefill_q_flops / question_flops,
        publish_s=publish_s, prefill_s=prefill_s, load_s=load_s, reuse_s=reuse_s, reuse_resident_s=resident_s,
        prefill_dollars=prefill_d, reuse_dollars=reuse_d, reuse_resident_dollars=resident_d,
        egress_dollars=egress_d, egress_vs_prefill=egress_d / prefill_d,
        saving=prefill_s / reuse_s,
        break_even_reuses=break_even_reuses(publish_d, prefill_d, reuse_d),
        break_even_shipped=break_even_reuses(publish_d, prefill_d, reuse_d + egress_d),
        total_reprefill_dollars=serve_cost(agents, prefill_d),
        total_reuse_dollars=serve_cost(agents, reuse_d, publish_d),
        total_shipped_dollars=serve_cost(agents, reuse_d + egress_d, publish_d),
        tariff_headroom=tariff_headroom(prefill_d, reuse_d, cache_read_fraction),
        tariff_headroom_resident=(tariff_headroom(prefill_d, resident_d, cache_read_fraction)
                                  if resident_d is not None else None),
        batch=batch, notes=notes,
        origin_bytes_per_s=origin_bytes_per_s, origin_fetch_s=kvb / origin_bytes_per_s,
        origin_fetch_vs_prefill=kvb / origin_bytes_per_s / prefill_s,
    )


def saving_curve(shape: ModelShape, lengths: Iterable[int], **estimate_args: Any) -> list[tuple[int, float]]:
    """``(tokens, prefill / reuse)`` of :func:`estimate` at each length (first principles)."""
    return [(n, estimate(shape, n, **estimate_args).saving) for n in lengths]


def with_price(hw: Hardware, dollars_per_hour: float | None = None, mfu: float | None = None,
               link_bytes_per_s: float | None = None) -> Hardware:
    """``hw`` with any of its price, mfu or link bandwidth replaced (the CLI's overrides)."""
    changes = {k: v for k, v in (("dollars_per_hour", dollars_per_hour), ("mfu", mfu),
                                 ("link_bytes_per_s", link_bytes_per_s)) if v is not None}
    return replace(hw, **changes)
