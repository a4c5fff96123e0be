"""kvfast.integrations.vllm_layout: vLLM's KV cache layouts measured through a writer, or refused (no vLLM needed).

The writers below re-state how vLLM 0.32's backends place K and V (the CPU backend's ``vec`` ISA: per block and
head, K's dims as columns then V's tokens as rows; FlashAttention: K and V side by side in each token's content),
plus layouts that must be refused. The real CPU backend is checked in tests/vllm.
"""
from __future__ import annotations

import pytest
import torch

import kvfast
from kvfast.cache.pages import KVPages
from kvfast.errors import PagesError
from kvfast.integrations.vllm.layout import KVLayoutError, KVSpec, discover_views, layer_index

BLOCKS, BLOCK, HEADS, DIM = 5, 32, 2, 64
SPEC = KVSpec(BLOCKS, BLOCK, HEADS, DIM, torch.float32)
FP = "sha256:" + "ab" * 32


def cpu_vec_writer(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """[B, H, N, 2D]; each (block, head) plane: K as [D, N] (dims as rows), then V as [N, D]."""
    b, n = slots // BLOCK, slots % BLOCK
    plane = cache.reshape(cache.shape[0], cache.shape[1], -1)  # [B, H, N * 2D]
    kt = plane[..., : BLOCK * DIM].unflatten(-1, (DIM, BLOCK))
    vr = plane[..., BLOCK * DIM :].unflatten(-1, (BLOCK, DIM))
    kt[b, :, :, n] = k
    vr[b, :, n] = v


def flash_writer(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """[B, H, N, 2D] with K then V in the content dimension (any strides)."""
    b, n = slots // BLOCK, slots % BLOCK
    cache[b, :, n, :DIM] = k
    cache[b, :, n, DIM:] = v


def vnni_writer(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """K in pairs of dims interleaved with tokens ([D/2, N, 2]): no strides describe it."""
    b, n = slots // BLOCK, slots % BLOCK
    plane = cache.reshape(cache.shape[0], cache.shape[1], -1)
    kp = plane[..., : BLOCK * DIM].unflatten(-1, (DIM // 2, BLOCK, 2))
    kp[b, :, :, n, :] = k.unflatten(-1, (DIM // 2, 2))
    plane[..., BLOCK * DIM :].unflatten(-1, (BLOCK, DIM))[b, :, n] = v


def cpu_tensor() -> torch.Tensor:
    return torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM)


def nhd_tensor() -> torch.Tensor:
    """Logical [B, H, N, 2D] stored as [B, N, H, 2D] (vLLM's LBNHC): strided on purpose."""
    return torch.zeros(BLOCKS, BLOCK, HEADS, 2 * DIM).transpose(1, 2)


LAYOUTS = [("cpu-vec", cpu_tensor, cpu_vec_writer), ("flash-HND", cpu_tensor, flash_writer),
           ("flash-NHD", nhd_tensor, flash_writer)]


def written(writer, make) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A cache filled by ``writer`` with random tokens at every slot, and those tokens, K and V ``[B * N, H, D]``."""
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(BLOCKS * BLOCK, HEADS, DIM, generator=g) for _ in range(2))
    cache = make()
    writer(k, v, cache, torch.arange(BLOCKS * BLOCK))
    return cache, k, v


@pytest.mark.parametrize("name,make,writer", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_views_read_what_the_backend_wrote(name, make, writer) -> None:
    cache, k, v = written(writer, make)
    kv, vv = discover_views("model.layers.0.self_attn.attn", cache, SPEC, writer)
    assert kv.shape == vv.shape == (BLOCKS, HEADS, BLOCK, DIM)
    assert kv.data_ptr() >= cache.data_ptr() and kv.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    assert torch.equal(kv.transpose(1, 2).reshape(-1, HEADS, DIM), k)
    assert torch.equal(vv.transpose(1, 2).reshape(-1, HEADS, DIM), v)


def test_cpu_layout_keeps_k_transposed() -> None:
    kv, vv = discover_views("model.layers.0.self_attn.attn", cpu_tensor(), SPEC, cpu_vec_writer)
    assert kv.stride()[2:] == (1, BLOCK) and vv.stride()[2:] == (DIM, 1)
    assert vv.storage_offset() - kv.storage_offset() == BLOCK * DIM


@pytest.mark.parametrize("name,make,writer", LAYOUTS, ids=[x[0] for x in LAYOUTS])
@pytest.mark.parametrize("backend", ["native", "python"])
def test_load_into_vllm_pages_equals_backend_write(tmp_path, name, make, writer, backend) -> None:
    """kvfast.load into the views fills exactly the bytes the backend's own writer puts there."""
    if backend == "native" and kvfast.backend()["io"] != "native":
        pytest.skip("native extension not built")
    _, k, v = written(writer, make)
    layers = 2
    caches = [make() for _ in range(layers)]
    views = [discover_views(f"model.layers.{i}.attn", caches[i], SPEC, writer) for i in range(layers)]
    pages = KVPages([kk for kk, _ in views], [vv for _, vv in views], layout="HND")
    n = 3 * BLOCK + 7  # a partial last block, on purpose
    order = [4, 0, 2, 1]  # the request's vLLM blocks, not in order
    slot_of = torch.tensor([order[t // BLOCK] * BLOCK + t % BLOCK for t in range(n)])
    kvfast.save_kv(tmp_path / "d.kvf", [k[:n]] * layers, [v[:n]] * layers, list(range(n)), fingerprint=FP,
                   chunk_tokens=64)
    handle = kvfast.load_into(tmp_path / "d.kvf", pages, order, fingerprint=FP, backend=backend)
    assert handle.num_tokens == n and handle.backend == backend and handle.sequence is None
    reference = make()
    writer(k[:n], v[:n], reference, slot_of)
    for cache in caches:
        assert torch.equal(cache, reference)
    gk, gv = pages.gather(1, order, n)
    assert torch.equal(gk, k[:n]) and torch.equal(gv, v[:n])


def test_vllm_pages_refuse_too_few_blocks_before_writing(tmp_path) -> None:
    views = discover_views("model.layers.0.attn", cpu_tensor(), SPEC, cpu_vec_writer)
    pages = KVPages([views[0]], [views[1]], layout="HND")
    _, k, v = written(cpu_vec_writer, cpu_tensor)
    kvfast.save_kv(tmp_path / "d.kvf", [k[: BLOCK + 1]], [v[: BLOCK + 1]], list(range(BLOCK + 1)), fingerprint=FP)
    before = views[0].clone()
    with pytest.raises(PagesError, match="need 2 blocks"):
        kvfast.load_into(tmp_path / "d.kvf", pages, [0], fingerprint=FP)
    assert torch.equal(views[0], before)


# -- refusals ------------------------------------------------------------------------------------------------------
def dropping_writer(k, v, cache, slots) -> None:
    flash_writer(k[1:], v[1:], cache, slots[1:])


def merging_writer(k, v, cache, slots) -> None:
    b, n = slots // BLOCK, slots % BLOCK
    cache[b, :, n, :DIM] = k
    cache[b, :, n, :DIM] += v  # V on top of K


def failing_writer(k, v, cache, slots) -> None:
    raise RuntimeError("unsupported isa")


@pytest.mark.parametrize("writer,message", [
    (vnni_writer, "no strides describe"),
    (dropping_writer, "placed"),
    (merging_writer, "share memory"),
    (failing_writer, "writer failed"),
], ids=["packed-tiles", "drops-tokens", "k-and-v-overlap", "writer-raises"])
def test_unknown_layouts_are_refused(writer, message) -> None:
    with pytest.raises(KVLayoutError, match=message) as info:
        discover_views("model.layers.3.self_attn.attn", cpu_tensor(), SPEC, writer)
    assert "model.layers.3.self_attn.attn" in str(info.value)


def test_quantized_or_misshaped_caches_are_refused() -> None:
    with pytest.raises(KVLayoutError, match="kv_cache_dtype"):
        discover_views("l.layers.0.a", cpu_tensor().to(torch.float8_e4m3fn), SPEC, flash_writer)
    fp8_as_bytes = KVSpec(BLOCKS, BLOCK, HEADS, DIM, torch.uint8)  # what vLLM reports for an fp8 cache
    with pytest.raises(KVLayoutError, match="quantized kv_cache_dtype"):
        discover_views("l.layers.0.a", cpu_tensor().to(torch.uint8), fp8_as_bytes, flash_writer)
    with pytest.raises(KVLayoutError, match="block axis"):
        discover_views("l.layers.0.a", torch.zeros(BLOCKS + 1, HEADS, BLOCK, 2 * DIM), SPEC, flash_writer)


def test_padded_block_planes_are_refused() -> None:
    """The CPU packing needs each block's N x C plane dense; a padded one has no strided K view."""
    padded = torch.zeros(BLOCKS, HEADS, BLOCK, 2 * DIM + 8)[..., : 2 * DIM]
    with pytest.raises(KVLayoutError, match="no strides describe"):
        discover_views("l.layers.0.a", padded, SPEC, cpu_vec_writer)


@pytest.mark.parametrize("name,index", [("model.layers.0.self_attn.attn", 0), ("layers.12.attn", 12),
                                        ("model.language_model.layers.3.self_attn.attn", 3)])
def test_layer_index(name, index) -> None:
    assert layer_index(name) == index


def test_layer_index_refuses_unknown_names() -> None:
    with pytest.raises(KVLayoutError, match="layers"):
        layer_index("model.decoder.attn")
