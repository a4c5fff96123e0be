"""Host-side checks shared by the Triton and CUDA wrappers: validate once, then describe the copy by strides.

Both kernels see the same problem: ``num_layers`` layers of ``[num_tokens, H, D]`` source rows, each row
copied to ``cache[layer, block_idx, block_offset, head]`` (NHD) or ``cache[layer, block_idx, head, block_offset]``
(HND). The layout only says which cache stride is the in-page one, so one stride-driven kernel serves NHD, HND,
kv-first and blocks-first stacks and vLLM's packed ``[..., 2 * D]`` pages alike. Kernels copy bits: every
tensor is reinterpreted as the unsigned/signed integer of its element size, so no float path can touch a NaN
payload, and one compiled kernel serves fp32/fp16/bf16/fp8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvfast.cache import ops

# Element size in bytes -> the integer type the kernels copy (same bits, no float semantics).
BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SLOT_DTYPES = (torch.int32, torch.int64)


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as the integer type of its element size (a view: same storage, same strides)."""
    return t.view(BITS_DTYPES[t.element_size()])


@dataclass(frozen=True)
class ScatterPlan:
    """One scatter, described for a kernel. Strides are in elements; every tensor is a bits view.

    Fields:
        src_k, src_v: ``[num_layers, num_tokens, num_heads, head_dim]``.
        k_cache, v_cache: ``[num_layers, num_blocks, *page]``.
        slot_mapping: ``[num_tokens]`` int32 or int64, contiguous (the kernels index it as a plain array).
        src_k_strides, src_v_strides: ``(layer, token, head)``.
        k_cache_strides, v_cache_strides: ``(layer, block, page, head)``; ``page`` is the in-page token stride.
    """

    src_k: torch.Tensor
    src_v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_layers: int
    num_tokens: int
    num_heads: int
    head_dim: int
    block_size: int
    src_k_strides: tuple[int, int, int]
    src_v_strides: tuple[int, int, int]
    k_cache_strides: tuple[int, int, int, int]
    v_cache_strides: tuple[int, int, int, int]


@dataclass(frozen=True)
class GatherPlan:
    """One gather, described for a kernel. Strides are in elements; every tensor is a bits view.

    Fields:
        k_cache, v_cache: ``[num_blocks, *page]``.
        block_table: ``[>= ceil(num_tokens / block_size)]`` int32 or int64, contiguous.
        out_k, out_v: ``[num_tokens, num_heads, head_dim]``, new and contiguous (bits views of ``k``, ``v``).
        k, v: the same outputs in the caches' dtype, what the caller gets back.
        k_cache_strides, v_cache_strides: ``(block, page, head)``.
        out_strides: ``(token, head)`` of both outputs.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    out_k: torch.Tensor
    out_v: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    num_tokens: int
    num_heads: int
    head_dim: int
    block_size: int
    k_cache_strides: tuple[int, int, int]
    v_cache_strides: tuple[int, int, int]
    out_strides: tuple[int, int]


def page_geometry(cache: torch.Tensor, layout: str) -> tuple[int, int, int, tuple[int, int, int]]:
    """``(block_size, num_heads, head_dim, (block_stride, page_stride, head_stride))`` of a cache whose last four
    dimensions are ``[num_blocks, *page]`` (leading dimensions, e.g. layers, are ignored)."""
    shape, stride = cache.shape[-4:], cache.stride()[-4:]
    if layout == "NHD":  # [num_blocks, block_size, H, D]
        _, block_size, num_heads, head_dim = shape
        strides = (stride[0], stride[1], stride[2])
    else:  # HND: [num_blocks, H, block_size, D]
        _, num_heads, block_size, head_dim = shape
        strides = (stride[0], stride[2], stride[1])
    return block_size, num_heads, head_dim, strides


def plan_scatter(src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, layout: str, device_type: str | None = None) -> ScatterPlan:
    """Check a multi-layer scatter and describe it.

    Args:
        src_k, src_v: ``[num_layers, num_tokens, H, D]``.
        k_cache, v_cache: ``[num_layers, num_blocks, *page]`` in ``layout``.
        slot_mapping: ``[num_tokens]``.
        device_type: when given, the device type every tensor must be on (``"cuda"`` for the CUDA kernels).
    """
    ops.check_layout(layout)
    tensors = {"src_k": src_k, "src_v": src_v, "k_cache": k_cache, "v_cache": v_cache}
    if src_k.dim() != 4 or src_v.shape != src_k.shape:
        raise ValueError(f"src_k and src_v must have one shape [num_tokens, num_kv_heads, head_dim]; got "
                         f"{tuple(src_k.shape[1:])} and {tuple(src_v.shape[1:])}")
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one {layout} page shape [num_blocks, *page]; got "
                         f"{tuple(k_cache.shape[1:])} and {tuple(v_cache.shape[1:])}")
    _check_dtypes_devices(tensors, device_type)
    num_layers, num_tokens, num_heads, head_dim = src_k.shape
    if k_cache.shape[0] != num_layers:
        raise ValueError(f"src has {num_layers} layers but the cache {k_cache.shape[0]}; slice the cache's layers "
                         "to the chunk's")
    block_size, cache_heads, cache_dim, _ = page_geometry(k_cache, layout)
    if (cache_heads, cache_dim) != (num_heads, head_dim):
        raise ValueError(f"src is (kv_heads, head_dim) = {(num_heads, head_dim)} but the {layout} cache "
                         f"{(cache_heads, cache_dim)}; is the layout right?")
    _check_slots(slot_mapping, "slot_mapping", src_k.device)
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {num_tokens} tokens")

    def cache_strides(cache: torch.Tensor) -> tuple[int, int, int, int]:
        return (cache.stride(0), *page_geometry(cache, layout)[3])

    return ScatterPlan(
        src_k=as_bits(src_k), src_v=as_bits(src_v), k_cache=as_bits(k_cache), v_cache=as_bits(v_cache),
        slot_mapping=slot_mapping.contiguous(), num_layers=num_layers, num_tokens=num_tokens, num_heads=num_heads,
        head_dim=head_dim, block_size=block_size,
        src_k_strides=(src_k.stride(0), src_k.stride(1), src_k.stride(2)),
        src_v_strides=(src_v.stride(0), src_v.stride(1), src_v.stride(2)),
        k_cache_strides=cache_strides(k_cache), v_cache_strides=cache_strides(v_cache),
    )


def plan_scatter_one_layer(src_k: torch.Tensor, src_v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, layout: str, device_type: str | None = None) -> ScatterPlan:
    """:func:`plan_scatter` for one layer: ``src_*`` ``[num_tokens, H, D]``, caches ``[num_blocks, *page]``."""
    if src_k.dim() != 3 or src_v.dim() != 3:
        raise ValueError(f"src_k and src_v must be [num_tokens, num_kv_heads, head_dim]; got {tuple(src_k.shape)} "
                         f"and {tuple(src_v.shape)}")
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"k_cache and v_cache must be one layer's 4-d {layout} pages; got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    # A layer axis of length 1: its stride is never multiplied by anything but 0.
    return plan_scatter(src_k[None], src_v[None], k_cache[None], v_cache[None], slot_mapping, layout, device_type)


def plan_scatter_layers(src: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, layout: str,
                        device_type: str | None = None) -> ScatterPlan:
    """:func:`plan_scatter` for a staging chunk ``[L, 2, T, H, D]`` and a cache ``[L, 2, num_blocks, *page]``."""
    if src.dim() != 5 or src.shape[1] != 2:
        raise ValueError(f"src must be [num_layers, 2, num_tokens, num_kv_heads, head_dim]; got {tuple(src.shape)}")
    if cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"cache must be [num_layers, 2, num_blocks, *page] (PagedKVCache.storage or a view of that "
                         f"shape); got {tuple(cache.shape)}")
    return plan_scatter(src[:, 0], src[:, 1], cache[:, 0], cache[:, 1], slot_mapping, layout, device_type)


def plan_gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
                layout: str, device_type: str | None = None) -> GatherPlan:
    """Check a gather, allocate its outputs and describe it (caches ``[num_blocks, *page]``)."""
    ops.check_layout(layout)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one {layout} shape [num_blocks, *page]; got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check_dtypes_devices({"k_cache": k_cache, "v_cache": v_cache}, device_type)
    _check_slots(block_table, "block_table", k_cache.device)
    block_size, num_heads, head_dim, k_strides = page_geometry(k_cache, layout)
    v_strides = page_geometry(v_cache, layout)[3]
    if not isinstance(num_tokens, int) or not 0 <= num_tokens <= block_table.shape[0] * block_size:
        raise ValueError(f"num_tokens must be an int in [0, {block_table.shape[0] * block_size}] (the block table "
                         f"holds {block_table.shape[0]} blocks of {block_size}); got {num_tokens!r}")
    k = torch.empty(num_tokens, num_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    return GatherPlan(
        k_cache=as_bits(k_cache), v_cache=as_bits(v_cache), block_table=block_table.contiguous(), out_k=as_bits(k),
        out_v=as_bits(v), k=k, v=v, num_tokens=num_tokens, num_heads=num_heads, head_dim=head_dim,
        block_size=block_size, k_cache_strides=k_strides, v_cache_strides=v_strides,
        out_strides=(k.stride(0), k.stride(1)),
    )


def _check_dtypes_devices(tensors: dict[str, torch.Tensor], device_type: str | None) -> None:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        got = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise TypeError(f"K/V and caches must share one dtype, got {got}; kvfast never converts KV silently")
    dtype = dtypes.pop()
    if dtype.is_complex or dtype == torch.bool or next(iter(tensors.values())).element_size() not in BITS_DTYPES:
        raise TypeError(f"unsupported KV dtype {dtype}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device_type is not None and device.type != device_type:
        raise ValueError(f"these kernels run on {device_type} tensors, got {device}; use kvfast.cache.ops on other devices")
    for name, t in tensors.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride 1), got strides {t.stride()}; pass "
                             f"{name}.contiguous() or a view whose last dimension is contiguous")


def _check_slots(index: torch.Tensor, name: str, device: torch.device) -> None:
    if index.dim() != 1 or index.dtype not in SLOT_DTYPES:
        raise ValueError(f"{name} must be a 1-d int32 or int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the caches on {device}; move it with .to({str(device)!r})")
