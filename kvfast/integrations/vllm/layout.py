"""vLLM's KV cache tensors seen as kvfast pages: the layout is measured, never assumed, or it is refused.

vLLM (0.32) hands a connector one tensor per attention layer, logically ``[num_blocks, H, block_size, C]``,
whose strides follow the engine's KV cache layout (LBHNC, LBNHC, ...). Where K and V of a token live inside it
is the attention backend's choice and can even depend on the CPU's instruction set: the CPU backend packs each
(block, head) plane as K's columns then V's rows on AVX-512 (``vec``), differently with AMX; FlashAttention
puts K and V side by side in each token's content. Shape alone cannot tell these apart.

So :func:`discover_views` asks the backend itself. It writes probe tokens with the backend's own KV writer
(``impl.do_kv_cache_update``) into a two-block scratch tensor laid out like the layer's, decodes where each
``(token, head, dim)`` of K and of V landed, and requires that to be affine: ``offset = o + block * Sb + head * Sh
+ token * St + dim * Sd``. Then K and V are ``as_strided`` views of the real tensor with those strides, which
kvfast's loader, scatter and gather address directly. Anything else -- a quantized cache, a packing that no
strides describe (e.g. VNNI tiles), a writer that drops or duplicates elements, overlapping K and V -- raises a
:class:`KVLayoutError` saying what was found. Nothing here imports vLLM; the connector passes the writer in.

The views are kvfast's HND pages: K and V each ``[num_blocks, H, block_size, D]``, any strides.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvfast.errors import KVLayoutError

# (key [T, H, D], value [T, H, D], kv_cache shaped like the layer's, slot_mapping [T] int64) -> writes like the backend
KVWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what .kvf files hold (docs/FORMAT.md)
_CODE = 128  # probe codes are < 128, exact in every float dtype a KV cache uses (bf16 holds integers to 256)


@dataclass(frozen=True)
class KVSpec:
    """What the engine says one layer's KV cache holds (vLLM's ``kv_cache_config``).

    Attributes:
        num_blocks, block_size: blocks of the cache and tokens per block (the scheduler's block size).
        num_kv_heads, head_dim: of the model.
        dtype: of the cache.
    """

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


def layer_index(name: str) -> int:
    """The decoder layer a vLLM attention layer name belongs to (``"model.layers.7.self_attn.attn"`` -> 7).

    Raises:
        KVLayoutError: the name holds no ``layers.<i>.`` part.
    """
    m = _LAYER_RE.search(name)
    if m is None:
        raise KVLayoutError(f"layer {name!r}: no 'layers.<index>.' in its name, so kvfast cannot tell which "
                            "layer of a .kvf file it holds")
    return int(m[1])


def discover_views(name: str, kv: torch.Tensor, spec: KVSpec, write: KVWriter) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one layer's vLLM cache tensor as ``[num_blocks, H, block_size, D]`` views of its memory.

    Args:
        name: the layer's name (for messages).
        kv: the tensor vLLM allocated for the layer (block axis first), any strides.
        spec: what the engine says the layer holds.
        write: the backend's KV writer (see :data:`KVWriter`); called on a small scratch tensor only.

    Raises:
        KVLayoutError: the dtype or block count differ from ``spec``, or the writer's placement is not an
            affine, non-overlapping map of (block, head, token, dim) for K and for V.

    Example:
        >>> spec = KVSpec(num_blocks=4, block_size=32, num_kv_heads=2, head_dim=64, dtype=torch.float32)
        >>> def write(k, v, cache, slots):                      # FlashAttention-style: K, V side by side in C
        ...     b, n = slots // 32, slots % 32
        ...     cache[b, :, n, :64], cache[b, :, n, 64:] = k, v
        >>> k, v = discover_views("model.layers.0.attn", torch.zeros(4, 2, 32, 128), spec, write)
        >>> k.stride(), v.storage_offset()
        ((8192, 4096, 128, 1), 64)
    """
    where = f"vLLM KV cache of layer {name!r} (shape {tuple(kv.shape)}, strides {kv.stride()}, {kv.dtype})"
    if kv.dtype != spec.dtype or kv.dtype not in _KV_DTYPES:
        raise KVLayoutError(f"{where}: the cache holds {kv.dtype} for {spec.dtype} KV; kvfast documents hold KV in "
                            "the model's float dtype, which a quantized kv_cache_dtype (fp8...) cannot take: serve "
                            "with kv_cache_dtype='auto'")
    if kv.dim() < 2 or kv.shape[0] != spec.num_blocks:
        raise KVLayoutError(f"{where}: expected the block axis ({spec.num_blocks} blocks) first")
    if max(spec.block_size, spec.num_kv_heads, spec.head_dim) * 2 > _CODE * _CODE:
        raise KVLayoutError(f"{where}: block_size, heads or head_dim too large to probe")
    try:
        probe = _Probe(_scratch_like(kv), spec, write)
        k_at, v_at = probe.offsets("K", kv.stride()), probe.offsets("V", kv.stride())  # [2 * bs, H, D] each
    except KVLayoutError as exc:
        raise KVLayoutError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the backend's writer refusing a probe is a refusal, not a crash
        raise KVLayoutError(f"{where}: the backend's KV writer failed on a probe ({type(exc).__name__}: {exc})") \
            from None
    if torch.cat([k_at.reshape(-1), v_at.reshape(-1)]).unique().numel() != 2 * k_at.numel():
        raise KVLayoutError(f"{where}: K and V elements share memory in this tensor's strides")
    views = []
    for what, at in (("K", k_at), ("V", v_at)):
        strides = _affine(at, spec.block_size)
        if strides is None:
            raise KVLayoutError(f"{where}: the backend places {what} in a pattern no strides describe (packed "
                                "tiles, or a padded block?); kvfast supports layouts whose K and V are strided views")
        origin, sb, sh, st, sd = strides
        if sb != kv.stride(0) or min(sh, st, sd) < 0:
            raise KVLayoutError(f"{where}: {what} strides (block {sb}, head {sh}, token {st}, dim {sd}) do not keep "
                                "blocks apart")
        views.append(kv.as_strided((spec.num_blocks, spec.num_kv_heads, spec.block_size, spec.head_dim),
                                   (sb, sh, st, sd), kv.storage_offset() + origin))
    return views[0], views[1]


class _Probe:
    """Probe tokens written by the backend into ``scratch`` (two blocks), decoded back to coordinates."""

    def __init__(self, scratch: torch.Tensor, spec: KVSpec, write: KVWriter):
        self.scratch, self.write = scratch, write
        n, h, d = 2 * spec.block_size, spec.num_kv_heads, spec.head_dim
        self.shape = (n, h, d)
        self.slots = torch.arange(n, dtype=torch.int64, device=scratch.device)
        grid = torch.meshgrid(torch.arange(n), torch.arange(h), torch.arange(d), indexing="ij")
        self.coords = [c.to(scratch.device) for c in grid]  # token, head, dim of every probe element

    def _written(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.scratch.zero_()
        self.write(k.to(self.scratch.dtype), v.to(self.scratch.dtype), self.scratch, self.slots)
        return self.scratch.detach().clone()

    def offsets(self, which: str, strides: Sequence[int]) -> torch.Tensor:
        """``[2 * block_size, H, D]`` int64: where the writer puts each K (or V) element, as an element offset in a
        tensor of ``strides`` (the real cache's): logical coordinates found in the scratch, dotted with them."""
        ones, zeros = torch.ones(self.shape, device=self.scratch.device), torch.zeros(self.shape,
                                                                                   device=self.scratch.device)

        def put(x: torch.Tensor) -> torch.Tensor:
            return self._written(x, zeros) if which == "K" else self._written(zeros, x)

        mask = put(ones) != 0
        if int(mask.sum()) != ones.numel():
            raise KVLayoutError(f"the backend's writer placed {int(mask.sum())} {which} elements for "
                                f"{ones.numel()} written")
        # Each coordinate comes back in two passes (low and high base-128 digits), placed where the writer puts it.
        decoded = []
        for c in self.coords:
            lo, hi = put((c % _CODE).float())[mask].long(), put((c // _CODE).float())[mask].long()
            decoded.append(lo + _CODE * hi)
        where = mask.nonzero()  # [E, ndim] logical coordinates, in the same (row-major) order as the masked values
        element = (where * torch.tensor(list(strides), device=where.device)).sum(1)
        flat = (decoded[0] * self.shape[1] + decoded[1]) * self.shape[2] + decoded[2]
        if flat.unique().numel() != flat.numel():
            raise KVLayoutError(f"the backend's writer merges {which} elements")
        out = torch.empty(self.shape, dtype=torch.int64, device=where.device).reshape(-1)
        out[flat] = element
        return out.reshape(self.shape)


def _affine(at: torch.Tensor, block_size: int) -> tuple[int, int, int, int, int] | None:
    """``(origin, Sb, Sh, St, Sd)`` such that ``at[t, h, d] = origin + (t // bs) Sb + h Sh + (t % bs) St + d Sd``
    for every probe element, or None when no such strides exist."""
    n, h, d = at.shape
    origin = int(at[0, 0, 0])
    sb = int(at[block_size, 0, 0]) - origin if n > block_size else 0
    sh = int(at[0, 1, 0]) - origin if h > 1 else 0
    st = int(at[1, 0, 0]) - origin if block_size > 1 else 0
    sd = int(at[0, 0, 1]) - origin if d > 1 else 0
    t = torch.arange(n, device=at.device)
    want = (origin + (t // block_size * sb + t % block_size * st)[:, None, None]
            + (torch.arange(h, device=at.device) * sh)[None, :, None] + (torch.arange(d, device=at.device) * sd))
    return (origin, sb, sh, st, sd) if torch.equal(want, at) else None


def _scratch_like(kv: torch.Tensor) -> torch.Tensor:
    """A zeroed two-block tensor with ``kv``'s logical shape otherwise and its dimensions in the same memory order."""
    shape = (2, *kv.shape[1:])
    order = sorted(range(kv.dim()), key=lambda i: (kv.stride(i), i))  # innermost first
    strides, step = [0] * kv.dim(), 1
    for i in order:
        strides[i], step = step, step * shape[i]
    return torch.zeros(step, dtype=kv.dtype, device=kv.device).as_strided(shape, strides)
