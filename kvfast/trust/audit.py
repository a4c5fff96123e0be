"""Audit: check, cheaply, that a .kvf file's KV is what its model computes from its token ids.

K and V at layer l, position i depend only on token i and the K/V of earlier positions. So a consumer that holds
the model recomputes a few sampled positions as one decode step *against the stored prefix* and compares them,
layer by layer, with the stored K/V: no prefill of the whole document.

    merkle root ──HMAC(consumer secret)──▶ positions p_1 < ... < p_S   (unpredictable for the publisher)
    stored K/V [0, p_S) ──▶ DynamicCache                               (the prefix, as shipped)
    tokens[p], positions p ──one forward, S queries──▶ recomputed K/V of every layer at each p
        query j attends to the stored prefix [0, p_j) and to itself (a 4-D mask)
    compare with stored K/V at p: relative error per (position, layer, K|V) and per (layer, K|V) over all
    samples, against a tolerance calibrated from honest runs per dtype and attention implementation

What a sample sees: its own stored K/V directly, and every stored K/V before it indirectly, through attention:
an edit at i < j changes what j recomputes, while the stored K/V at j was made from the honest prefix. Edits in
the last layer, and a forger who recomputes everything after the edit from the edited prefix, are seen only by
a sample *at* an edited position (see bench/RESULTS.md "Trust" for what each costs to catch).

Layer 0 is cheaper to check than any other: its K/V depend on the token and its position alone (embedding,
norm, projection, RoPE), with no attention to anything stored. So besides the full-depth samples the audit
recomputes layer 0 alone at many more positions (``layer0_samples``, default 460: an edit of 1% of positions
that touches layer 0 is then caught with probability >= 99%), stopping each forward as soon as layer 0 has its
K and V. For Qwen3-4B's shape 460 such positions cost 0.04% of a 4096-token prefill, 48 full-depth ones ~1.3%.

Example:
    >>> report = kvfast.audit(model, "doc.kvf", samples=8)  # doctest: +SKIP
    >>> report.ok, report.cost_fraction                      # doctest: +SKIP
    (True, 0.0021)
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from kvfast import cost
from kvfast.errors import ModelMismatchError
from kvfast.identity import fingerprint as model_fingerprint
from kvfast.format import KvfReader, open_kvf
from kvfast.hf.capture import DEFAULT_PREFILL_CHUNK, capture_kv
from kvfast.trust.signing import digests

DEFAULT_SAMPLES = 8
DEFAULT_LAYER0_SAMPLES = 460  # 1 - 0.99**460 > 0.99: a 1% edit that touches layer 0 is caught at >= 99%
_DOMAIN = b"kvfast audit positions v1\0"


@dataclass(frozen=True)
class Tolerance:
    """Largest errors an honest file may show, per layer: ``||recomputed - stored|| / scale``, L2 over
    heads x head_dim, where ``scale`` is the RMS norm of the layer's stored K (or V) rows over the prefix (a
    row-independent scale, so a row that happens to be short does not inflate its error).

    Attributes:
        sample: per layer, the bound on one position's K (or V) error.
        layer: per layer, the bound on the RMS over the sampled positions (systematic drift, such as KV made by
            another checkpoint, shows here long before any single position stands out).
    """

    sample: tuple[float, ...]
    layer: tuple[float, ...]

    def to_json(self) -> dict[str, list[float]]:
        return {"sample": list(self.sample), "layer": list(self.layer)}


# Calibration (see :func:`calibrate`): honest publishers the auditor imitates, and how far above the largest
# honest error the tolerance sits. Layer 0's K/V depend on the token alone and recompute bit for bit here
# (every dtype, eager or SDPA, any thread count: bench/RESULTS.md "Trust"); the floors leave room for a
# publisher on other hardware (a few last-place differences), an allowance still owed a GPU measurement.
CALIBRATION_PUBLISHERS = (("eager", 1), ("sdpa", 1), ("eager", 0), ("sdpa", 0))  # (attention, threads; 0: all)
CALIBRATION_TOKENS, CALIBRATION_DOCS, CALIBRATION_SAMPLES = 512, 2, 128
MARGIN = 4.0
FLOOR_ULPS = {"sample": 1.0, "layer": 0.25}  # in units of the dtype's unit roundoff
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_calibrated: weakref.WeakKeyDictionary[Any, dict[tuple, Tolerance]] = weakref.WeakKeyDictionary()


def sample_positions(secret: bytes, merkle_root: str, num_tokens: int, samples: int) -> list[int]:
    """``samples`` positions of ``[0, num_tokens)`` the publisher cannot predict: the last one, and one per
    stratum of the rest drawn from ``HMAC-SHA-256(secret, merkle_root, ...)``.

    The last position attends to the whole document; the strata spread the others evenly, so a run of edited
    positions longer than ``num_tokens / samples`` always holds a sample. Sorted, distinct; all positions
    when ``samples >= num_tokens``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples >= num_tokens:
        return list(range(num_tokens))
    rest, strata = num_tokens - 1, samples - 1
    out = []
    for k in range(strata):
        a, b = k * rest // strata, (k + 1) * rest // strata
        msg = _DOMAIN + f"{merkle_root}:{num_tokens}:{samples}:{k}".encode()
        draw = int.from_bytes(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "little")
        out.append(a + draw % (b - a))
    return [*out, num_tokens - 1]


@torch.no_grad()
def recompute(model: Any, token_ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
              positions: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K and V of every layer at ``positions``, computed in one forward against the stored prefix.

    Args:
        model: a transformers causal LM (its decoder is run; no LM head).
        token_ids: ``[num_tokens]`` int64.
        keys, values: per layer, the stored ``[n, H, D]`` with ``n >= max(positions)``: the prefix the samples
            attend to (their own stored rows are not used).
        positions: sorted, distinct.

    Returns:
        Per layer, recomputed K and V ``[S, H, D]`` in the model's dtype.
    """
    device = model.device
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    n_ctx, s = int(pos[-1]), len(positions)
    past = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        # [n_ctx, H, D] -> [1, H, n_ctx, D], as DynamicCache holds them
        past.update(k[:n_ctx].to(device).transpose(0, 1)[None], v[:n_ctx].to(device).transpose(0, 1)[None], layer)
    dtype = next(model.parameters()).dtype
    allowed = torch.zeros(s, n_ctx + s, dtype=torch.bool, device=device)
    allowed[:, :n_ctx] = torch.arange(n_ctx, device=device)[None, :] < pos[:, None]  # the stored prefix [0, p_j)
    allowed[:, n_ctx:] = torch.eye(s, dtype=torch.bool, device=device)  # and itself
    mask = torch.zeros(1, 1, s, n_ctx + s, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)  # additive: eager adds it, SDPA takes it as is
    model.base_model(input_ids=token_ids.to(device)[pos][None], position_ids=pos[None], attention_mask=mask,
                     past_key_values=past, use_cache=True)
    new_k = [layer.keys[0, :, n_ctx:].transpose(0, 1) for layer in past.layers]
    new_v = [layer.values[0, :, n_ctx:].transpose(0, 1) for layer in past.layers]
    return new_k, new_v


def check(model: Any, token_ids: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
          positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors of the stored K/V at ``positions`` against their recomputation (:func:`recompute`).

    Args:
        keys, values: per layer, the stored ``[n, H, D]`` with ``n > max(positions)``.

    Returns:
        ``[S, L, 2]`` per (sample, layer, K|V) and ``[L, 2]`` RMS over the samples, relative to each layer's RMS
        row norm over ``[0, max(positions)]``; ``inf`` where anything is not finite.
    """
    new_k, new_v = recompute(model, token_ids, keys, values, positions)
    idx, stop = torch.tensor(positions), positions[-1] + 1
    per_sample, per_layer = [], []
    for layer in range(len(keys)):
        stored = torch.stack([keys[layer][:stop], values[layer][:stop]], 1).float().flatten(2)  # [stop, 2, H*D]
        scale = stored.square().sum(-1).mean(0).sqrt()  # [2]: RMS row norm of K and of V
        diff = torch.stack([new_k[layer], new_v[layer]], 1).float().flatten(2).cpu() - stored[idx]
        d2 = diff.square().sum(-1)  # [S, 2]
        per_sample.append(d2.sqrt() / scale)
        per_layer.append(d2.mean(0).sqrt() / scale)
    sample_errors, layer_errors = torch.stack(per_sample, 1), torch.stack(per_layer, 0)
    inf = torch.tensor(float("inf"))
    return (torch.where(sample_errors.isfinite(), sample_errors, inf),
            torch.where(layer_errors.isfinite(), layer_errors, inf))


def calibrate(model: Any, *, tokens: int = CALIBRATION_TOKENS, docs: int = CALIBRATION_DOCS,
              samples: int = CALIBRATION_SAMPLES, margin: float = MARGIN, seed: int = 0) -> Tolerance:
    """The tolerance of this model, dtype and attention implementation, from honest runs of the auditor's own.

    Prefills ``docs`` random documents of ``tokens`` tokens as each of :data:`CALIBRATION_PUBLISHERS` would
    (eager and SDPA attention, one thread and all), audits each at ``samples`` positions with the model as it
    is, and takes per layer ``margin`` x the largest error plus a floor (:data:`FLOOR_ULPS`). Cached per model
    object, fingerprint, attention implementation and thread count: a serving process pays it once.
    """
    attn, threads = str(getattr(model.config, "_attn_implementation", None)), torch.get_num_threads()
    key = (model_fingerprint(model), attn, threads, tokens, docs, samples, margin, seed)
    cache = _calibrated.setdefault(model, {})
    if key in cache:
        return cache[key]
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    worst_sample = worst_layer = None
    for _ in range(docs):
        ids = torch.randint(0, vocab, (tokens,), generator=g)
        positions = sorted(torch.randperm(tokens, generator=g)[:samples].tolist())
        for pub_attn, pub_threads in CALIBRATION_PUBLISHERS:
            try:
                model.set_attn_implementation(pub_attn)
                torch.set_num_threads(pub_threads or threads)
                keys, values = capture_kv(model, ids)
            finally:
                model.set_attn_implementation(attn)
                torch.set_num_threads(threads)
            se, le = check(model, ids, keys, values, positions)
            se, le = se.amax((0, 2)), le.amax(1)  # [L]
            se[0] = torch.maximum(se[0], check_layer0(model, ids, keys[0], values[0], positions).max())
            worst_sample = se if worst_sample is None else torch.maximum(worst_sample, se)
            worst_layer = le if worst_layer is None else torch.maximum(worst_layer, le)
    u = UNIT_ROUNDOFF[next(model.parameters()).dtype]
    tol = Tolerance(tuple((margin * worst_sample + FLOOR_ULPS["sample"] * u).tolist()),
                    tuple((margin * worst_layer + FLOOR_ULPS["layer"] * u).tolist()))
    cache[key] = tol
    return tol


class _Layer0(Exception):
    """Carries layer 0's K and V out of a forward that has no use for the rest."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__("layer 0's K and V")
        self.keys, self.values = keys, values


class _StopAtLayer0(DynamicCache):
    """A cache whose first update (layer 0's K and V, after projection, norm and RoPE) ends the forward."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> Any:
        raise _Layer0(key_states, value_states)


@torch.no_grad()
def recompute_layer0(model: Any, token_ids: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's K and V ``[S, H, D]`` at ``positions``: they depend on the token and its position alone, so no
    prefix is needed, and the forward stops where layer 0 hands them to the cache (no attention, no MLP, no
    other layer: the embedding lookup, one norm and layer 0's q/k/v projections per position)."""
    device = model.device
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    try:
        model.base_model(input_ids=token_ids.to(device)[pos][None], position_ids=pos[None],
                         past_key_values=_StopAtLayer0(), use_cache=True)
    except _Layer0 as got:
        return got.keys[0].transpose(0, 1), got.values[0].transpose(0, 1)
    raise TypeError(f"{type(model).__name__} never handed layer 0's K/V to its cache: the audit needs a "
                    "transformers decoder that uses past_key_values")


def layer0_flops(shape: cost.ModelShape, positions: int) -> int:
    """FLOPs of :func:`recompute_layer0` at ``positions`` positions: layer 0's q, k and v projections (the
    forward stops before attention; embedding lookups and the norm are not matmuls)."""
    return 2 * positions * shape.hidden * shape.head_dim * (shape.heads + 2 * shape.kv_heads)


def check_layer0(model: Any, token_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: list[int]) -> torch.Tensor:
    """Errors ``[S, 2]`` (K, V) of layer 0's stored ``keys``/``values`` ``[n, H, D]`` at ``positions`` against
    :func:`recompute_layer0`, relative to the layer's RMS row norm over all ``n`` positions, as :func:`check`."""
    new_k, new_v = recompute_layer0(model, token_ids, positions)
    stored = torch.stack([keys, values], 1).float().flatten(2)  # [n, 2, H*D]
    scale = stored.square().sum(-1).mean(0).sqrt()
    diff = torch.stack([new_k, new_v], 1).float().flatten(2).cpu() - stored[torch.tensor(positions)]
    errors = diff.square().sum(-1).sqrt() / scale
    return torch.where(errors.isfinite(), errors, torch.tensor(float("inf")))


@dataclass
class AuditReport:
    """The result of :func:`audit`.

    Attributes:
        ok: every error within tolerance (and finite).
        path: the file.
        num_tokens: document length.
        positions: the full-depth samples.
        sample_errors: ``[S, L, 2]`` errors per (sample, layer, K|V) (see :class:`Tolerance`); ``inf`` for
            non-finite values.
        layer0_positions: the positions whose layer 0 alone was recomputed.
        layer0_errors: ``[S0, 2]`` their errors (K, V), against layer 0's sample tolerance.
        layer_errors: ``[L, 2]`` RMS errors per (layer, K|V) over the samples.
        tolerance: what they were compared with.
        worst: up to 5 ``{"position", "layer", "kv", "error", "tolerance"}``, largest error/tolerance first.
        failed_layers: layers whose RMS error exceeds its tolerance.
        flops: FLOPs of the audit's forward (dense attention over the prefix, as executed).
        prefill_flops: FLOPs of prefilling the document (:func:`kvfast.cost.prefill_flops`).
        merkle_root: the artifact's (the sample positions derive from it).
        seconds: wall time of the recompute.
        attn_implementation: the auditor's.
    """

    ok: bool
    path: str
    num_tokens: int
    positions: list[int]
    sample_errors: torch.Tensor = field(repr=False)
    layer_errors: torch.Tensor = field(repr=False)
    layer0_positions: list[int] = field(repr=False)
    layer0_errors: torch.Tensor = field(repr=False)
    tolerance: Tolerance = field(repr=False)
    worst: list[dict[str, Any]]
    failed_layers: list[int]
    flops: int
    prefill_flops: int
    merkle_root: str
    seconds: float
    attn_implementation: str

    @property
    def cost_fraction(self) -> float:
        """The audit's FLOPs as a fraction of the document's prefill FLOPs."""
        return self.flops / self.prefill_flops

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "path": self.path, "num_tokens": self.num_tokens, "samples": len(self.positions),
                "positions": self.positions, "layer0_samples": len(self.layer0_positions),
                "max_layer0_error": float(self.layer0_errors.max()) if len(self.layer0_positions) else 0.0,
                "worst": self.worst, "failed_layers": self.failed_layers,
                "layer_errors": self.layer_errors.amax(1).tolist(), "tolerance": self.tolerance.to_json(),
                "flops": self.flops, "prefill_flops": self.prefill_flops, "cost_fraction": self.cost_fraction,
                "merkle_root": self.merkle_root, "seconds": self.seconds,
                "attn_implementation": self.attn_implementation}


def audit(model: Any, path: str | os.PathLike | KvfReader, *, samples: int = DEFAULT_SAMPLES,
          layer0_samples: int = DEFAULT_LAYER0_SAMPLES, secret: bytes | None = None,
          tolerance: Tolerance | None = None, positions: list[int] | None = None) -> AuditReport:
    """Recompute ``samples`` positions of a .kvf file with ``model`` and compare them with the stored KV.

    Args:
        model: the model the file claims (its fingerprint must equal the file's), in the file's dtype.
        path: the .kvf file or an open reader.
        samples: positions to check at every layer (one batched forward; cost grows linearly, see
            ``cost_fraction``).
        layer0_samples: further positions whose layer 0 alone is checked (0: none; all when >= the length).
        secret: the consumer's secret (keep it from the publisher); default a fresh random one per audit.
        tolerance: default :func:`calibrate` (once per model, then cached).
        positions: check these positions instead of sampling (tests).

    Returns:
        An :class:`AuditReport`; ``report.ok`` is False when any error exceeds the tolerance.

    Raises:
        ModelMismatchError: the file was made for another model fingerprint (no audit needed: refuse it).
        FormatError: the file is invalid or corrupted.
    """
    if layer0_samples < 0:
        raise ValueError(f"layer0_samples must be >= 0, got {layer0_samples}")
    if isinstance(path, KvfReader):
        return _audit(model, path, samples, layer0_samples, secret, tolerance, positions)
    with open_kvf(path) as reader:
        return _audit(model, reader, samples, layer0_samples, secret, tolerance, positions)


def _audit(model: Any, reader: KvfReader, samples: int, layer0_samples: int, secret: bytes | None,
           tolerance: Tolerance | None, positions: list[int] | None) -> AuditReport:
    m = reader.manifest
    if model_fingerprint(model) != m.fingerprint:
        raise ModelMismatchError("the file names another model fingerprint; it cannot be attached to this model "
                                 "at all (audit checks KV that claims to be this model's)", path=reader.path)
    window = getattr(model.config, "sliding_window", None)
    if window and getattr(model.config, "use_sliding_window", True) and window < m.num_tokens:
        raise NotImplementedError(f"{reader.path}: audit of sliding-window models beyond their window "
                                  f"({window} < {m.num_tokens} tokens) is not implemented")
    if positions is not None and (not positions or sorted(set(positions)) != list(positions)
                                  or not 0 <= positions[0] <= positions[-1] < m.num_tokens):
        raise ValueError(f"positions must be sorted, distinct, within [0, {m.num_tokens})")
    tol = tolerance if tolerance is not None else calibrate(model)
    if len(tol.sample) != m.num_layers or len(tol.layer) != m.num_layers:
        raise ValueError(f"tolerance has {len(tol.sample)} layers, the file {m.num_layers}")
    root = digests(reader).merkle_root
    secret = secret if secret is not None else secrets.token_bytes(32)
    if positions is None:
        positions = sample_positions(secret, root, m.num_tokens, samples)
    layer0_positions = sample_positions(secret, root + "/layer0", m.num_tokens, layer0_samples) if layer0_samples \
        else []
    stop = positions[-1] + 1
    layers = [reader.read_layer(layer, 0, stop) for layer in range(m.num_layers)]
    t0 = time.perf_counter()
    sample_errors, layer_errors = check(model, reader.token_ids, [k for k, _ in layers], [v for _, v in layers],
                                        positions)
    layer0_errors = torch.zeros(0, 2)
    if layer0_positions:
        layer0_errors = check_layer0(model, reader.token_ids, *reader.read_layer(0, 0, m.num_tokens), layer0_positions)
    seconds = time.perf_counter() - t0
    sample_tol, layer_tol = torch.tensor(tol.sample)[None, :, None], torch.tensor(tol.layer)[:, None]
    failed_layers = sorted({int(l) for l in (layer_errors > layer_tol).nonzero()[:, 0]})
    ok = bool((sample_errors <= sample_tol).all() and (layer0_errors <= tol.sample[0]).all()) and not failed_layers
    shape = cost.ModelShape.from_config(model.config)
    chunk = int(m.metadata.get("prefill_chunk", DEFAULT_PREFILL_CHUNK))
    return AuditReport(
        ok=ok, path=str(reader.path), num_tokens=m.num_tokens, positions=list(positions),
        sample_errors=sample_errors, layer_errors=layer_errors, layer0_positions=layer0_positions,
        layer0_errors=layer0_errors, tolerance=tol,
        worst=_worst(sample_errors, sample_tol, positions, layer0_errors, layer0_positions),
        failed_layers=failed_layers, merkle_root=root, seconds=seconds,
        flops=cost.linear_flops(shape, len(positions)) + cost.attention_flops(shape, len(positions), stop - 1)
        + layer0_flops(shape, len(layer0_positions)),
        prefill_flops=cost.prefill_flops(shape, m.num_tokens, chunk=chunk),
        attn_implementation=str(getattr(model.config, "_attn_implementation", None)))


def _worst(sample_errors: torch.Tensor, sample_tol: torch.Tensor, positions: list[int], layer0_errors: torch.Tensor,
           layer0_positions: list[int], k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` (position, layer, K|V) with the largest error / tolerance, full-depth samples and layer-0 ones."""
    tol = sample_tol.expand_as(sample_errors)
    found = [(float(sample_errors[s, layer, kv] / tol[s, layer, kv]), positions[s], layer, kv,
              float(sample_errors[s, layer, kv]), float(tol[s, layer, kv]))
             for s, layer, kv in torch.nonzero(sample_errors >= 0).tolist()]
    tol0 = float(sample_tol[0, 0, 0])
    found += [(float(layer0_errors[s, kv]) / tol0, layer0_positions[s], 0, kv, float(layer0_errors[s, kv]), tol0)
              for s, kv in torch.nonzero(layer0_errors >= 0).tolist()]
    found.sort(key=lambda f: -f[0])
    return [{"position": p, "layer": layer, "kv": "KV"[kv], "error": err, "tolerance": t}
            for _, p, layer, kv, err, t in found[:k]]
