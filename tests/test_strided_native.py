"""The native host loader fills pages of every layout vLLM's layout probe can report, byte for byte like the
reference loader, and ``backend="auto"`` never sends such pages to the Python path.

kvfast.integrations.vllm.layout describes an engine's K and V as ``[num_blocks, H, block_size, D]`` views with any
non-negative strides, K's and V's independently (vLLM's CPU backend keeps K transposed inside a block, ``D``
strided, and V token-major). Here each such layout is built for real: the memory order of (head, token, dim) inside
a block, chosen separately for K and V, with padding between blocks, in every KV dtype.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import kvfast
from kvfast.cache.pages import KVPages

pytestmark = pytest.mark.skipif(kvfast.backend()["io"] != "native", reason="native extension not built")

BLOCKS, BLOCK, HEADS, DIM, LAYERS = 6, 16, 3, 12, 2  # DIM: whole vector tiles and a rest
FP = "sha256:" + "cd" * 32
INNER = list(itertools.permutations("htd"))  # memory order of (head, token, dim) inside a block, outermost first


def strided_pages(order: tuple[str, ...], dtype: torch.dtype, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed ``[BLOCKS, HEADS, BLOCK, DIM]`` view whose in-block memory order is ``order``, blocks ``pad``
    elements apart beyond their size; and the storage it views (to check nothing outside the view is written)."""
    size = {"h": HEADS, "t": BLOCK, "d": DIM}
    stride, step = {}, 1
    for axis in reversed(order):
        stride[axis], step = step, step * size[axis]
    block = step + pad
    storage = torch.zeros(BLOCKS * block + pad, dtype=dtype)
    view = storage.as_strided((BLOCKS, HEADS, BLOCK, DIM), (block, stride["h"], stride["t"], stride["d"]), pad)
    return view, storage


def document(tmp_path, dtype: torch.dtype, n: int):
    g = torch.Generator().manual_seed(n)
    k = [torch.randn(n, HEADS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    v = [torch.randn(n, HEADS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    path = tmp_path / f"d{n}.kvf"
    kvfast.save_kv(path, k, v, list(range(n)), fingerprint=FP, chunk_tokens=24)  # chunks straddle blocks
    return path, k, v


def fill(path, k_order, v_order, dtype, backend, table, num_tokens):
    made = [[strided_pages(k_order, dtype, 5), strided_pages(v_order, dtype, 3)] for _ in range(LAYERS)]
    pages = KVPages([m[0][0] for m in made], [m[1][0] for m in made], layout="HND")
    handle = kvfast.load_into(path, pages, table, fingerprint=FP, num_tokens=num_tokens, backend=backend)
    return handle, pages, [s for m in made for _, s in m]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k_order", INNER, ids="".join)
@pytest.mark.parametrize("v_order", INNER, ids="".join)
def test_every_strided_layout_loads_natively_and_bitwise(tmp_path, k_order, v_order, dtype) -> None:
    n = 3 * BLOCK + 5
    path, k, v = document(tmp_path, dtype, n + 9)  # a prefix load: the last chunk is read in part
    table = [4, 0, 5, 2]
    native, pages, native_storage = fill(path, k_order, v_order, dtype, "auto", table, n)
    assert (native.backend, native.method) == ("native", "preadv")  # never the Python path
    reference, _, reference_storage = fill(path, k_order, v_order, dtype, "python", table, n)
    assert reference.backend == "python"
    for got, want in zip(native_storage, reference_storage):  # every byte, padding and unused blocks included
        assert torch.equal(got.view(torch.uint8 if dtype != torch.float32 else torch.int32),
                           want.view(torch.uint8 if dtype != torch.float32 else torch.int32))
    for layer in range(LAYERS):
        gk, gv = pages.gather(layer, table, n)
        assert torch.equal(gk, k[layer][:n]) and torch.equal(gv, v[layer][:n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k_order", INNER, ids="".join)
@pytest.mark.parametrize("v_order", INNER, ids="".join)
def test_the_native_gather_reads_every_strided_layout_like_the_reference(k_order, v_order, dtype) -> None:
    """KVPages.gather of host pages runs natively (the mirror of the scatter: what a background save reads out of
    vLLM CPU's transposed K); its rows equal the PyTorch reference's bit for bit, padding around the view
    untouched by either."""
    from kvfast.cache import ops

    g = torch.Generator().manual_seed(7)
    made = [[strided_pages(k_order, dtype, 5), strided_pages(v_order, dtype, 3)] for _ in range(LAYERS)]
    for (_, k_storage), (_, v_storage) in made:  # every byte set, padding included: a stray read would show
        for s in (k_storage, v_storage):
            s.copy_(torch.randn(s.shape, generator=g).to(dtype))
    pages = KVPages([m[0][0] for m in made], [m[1][0] for m in made], layout="HND")
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for n, table in ((3 * BLOCK + 5, [4, 0, 5, 2]), (BLOCK, [3]), (1, [5]), (BLOCKS * BLOCK, [5, 4, 3, 2, 1, 0])):
        for layer in range(LAYERS):
            got = pages.gather(layer, table, n, start=n // 3)
            want = ops.gather_kv(pages.keys[layer], pages.values[layer], torch.tensor(table), n, layout="HND")
            for a, b in zip(got, want):
                assert a.is_contiguous() and torch.equal(a.view(bits), b[n // 3:].view(bits))


def test_the_native_gather_refuses_block_ids_outside_the_pages() -> None:
    (k, _), (v, _) = (strided_pages(order, torch.bfloat16, 0) for order in (("d", "t", "h"), ("h", "t", "d")))
    pages = KVPages([k], [v], layout="HND")
    with pytest.raises(kvfast.PagesError, match=f"block id {BLOCKS} is outside"):
        pages.gather(0, [0, BLOCKS], BLOCK + 1)
    with pytest.raises(kvfast.PagesError, match="need 2 blocks"):
        pages.gather(0, [0], BLOCK + 1)


def test_vllm_cpu_layout_loads_natively_from_a_real_file(tmp_path) -> None:
    """vLLM CPU's ``vec`` layout ([B, H, N, 2D]; per (block, head): K as [D, N], then V as [N, D]) at its block size
    of 128, bf16, several threads: the native job takes it and writes what the backend's own layout holds."""
    block, heads, dim, blocks, n = 128, 2, 64, 5, 300
    kv = [torch.zeros(blocks, heads, block, 2 * dim, dtype=torch.bfloat16) for _ in range(LAYERS)]
    plane = [t.reshape(blocks, heads, -1) for t in kv]
    keys = [p[..., : block * dim].unflatten(-1, (dim, block)).transpose(2, 3) for p in plane]  # [B, H, N, D]
    values = [p[..., block * dim :].unflatten(-1, (block, dim)) for p in plane]
    assert keys[0].stride()[2:] == (1, block) and values[0].stride()[2:] == (dim, 1)
    g = torch.Generator().manual_seed(1)
    k = [torch.randn(n, heads, dim, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    v = [torch.randn(n, heads, dim, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    kvfast.save_kv(tmp_path / "d.kvf", k, v, list(range(n)), fingerprint=FP)
    table = np.array([3, 1, 4])
    handle = kvfast.load_into(tmp_path / "d.kvf", KVPages(keys, values, layout="HND"), table, fingerprint=FP,
                              threads=3)
    assert (handle.backend, handle.method) == ("native", "preadv")
    for layer in range(LAYERS):
        for t in (0, 127, 128, 299):
            b, o = table[t // block], t % block
            assert torch.equal(plane[layer][b, :, : block * dim].unflatten(-1, (dim, block))[:, :, o], k[layer][t])
            assert torch.equal(plane[layer][b, :, block * dim :].unflatten(-1, (block, dim))[:, o], v[layer][t])
        assert plane[layer][[0, 2]].abs().sum() == 0  # blocks the table does not name stay untouched


def test_repeated_loads_into_one_engines_pages(tmp_path) -> None:
    """An engine loads into the same pages on every request (the job's byte views of them are made once): each
    load lands where its own block table says."""
    pages = KVPages(*zip(*[(strided_pages(("d", "t", "h"), torch.bfloat16, 5)[0],
                            strided_pages(("h", "t", "d"), torch.bfloat16, 3)[0]) for _ in range(LAYERS)]),
                    layout="HND")
    for n, table in ((2 * BLOCK, [3, 1]), (3 * BLOCK - 2, [0, 5, 2])):
        path, k, v = document(tmp_path, torch.bfloat16, n)
        assert kvfast.load_into(path, pages, table, fingerprint=FP).backend == "native"
        for layer in range(LAYERS):
            gk, gv = pages.gather(layer, table, n)
            assert torch.equal(gk, k[layer]) and torch.equal(gv, v[layer])
