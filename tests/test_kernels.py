"""Paged-cache kernels (Triton, CUDA) against the PyTorch reference in kvfast.cache.ops, bit for bit.

Every test runs on every available kernel backend through the ``backend`` fixture:

- ``triton-interpret``: the Triton kernels on CPU tensors in triton's interpreter (machines without a GPU);
- ``cuda-host``: the CUDA kernels of ``csrc/cuda/`` compiled for the CPU, every CTA and thread of the grid run
  in turn (``kvfast._C_cuda_host``): the GPU's index math and choice of copy word, on any machine;
- ``triton-gpu`` and ``cuda``: the compiled Triton and CUDA kernels on a GPU (marked ``gpu``).

The reference always runs on a CPU copy, so the oracle is the same everywhere. Inputs are random bit patterns
(NaN payloads, infinities, subnormals, -0 included) because the kernels must copy bits, not values. Each test
varies one axis around a default case; the interpreter is slow, so the full cartesian product is avoided.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Read by triton.jit when the kernels module is first imported (kvfast.kernels imports it lazily, and no
    # other module imports it on a machine without a GPU): the kernels then run in triton's CPU interpreter.
    os.environ["TRITON_INTERPRET"] = "1"

from kvfast.cache import ops  # noqa: E402
from kvfast._backend import paged_kernels  # noqa: E402
from kvfast.cache.paged import PagedKVCache  # noqa: E402

try:
    from kvfast import _C_cuda
    from kvfast.kernels import cuda as cuda_kernels
except ImportError:  # built without nvcc
    _C_cuda = cuda_kernels = None

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

BACKENDS = [
    pytest.param("triton-interpret", marks=pytest.mark.skipif(
        HAS_CUDA, reason="a GPU is present: Triton runs compiled (triton-gpu)")),
    pytest.param("cuda-host"),
    pytest.param("triton-gpu", marks=[pytest.mark.gpu, needs_cuda]),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda]),
]

# The default case, and the values each test sweeps one at a time.
DTYPE, HEAD_DIM, NUM_HEADS, BLOCK_SIZE, NUM_TOKENS = torch.bfloat16, 64, 3, 16, 37
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
HEAD_DIMS = [8, 64, 80, 128, 256]
NUM_HEADS_LIST = [1, 3, 8, 40]
BLOCK_SIZES = [1, 16, 32, 128]
LAYOUTS = ["NHD", "HND"]
NUM_TOKENS_LIST = [0, 1, 37, 203]
SLOT_DTYPES = [torch.int32, torch.int64]
# Slot mappings and block tables as given, or as a strided view (every other entry of a wider tensor).
INDEX_VIEWS = ["contiguous", "strided"]
# How one layer's K and V caches sit in memory: own tensors, kv-first [2, nb, ...], blocks-first [nb, 2, ...],
# or vLLM's packed HND pages [nb, H, bs, 2 * D] with K and V as the two halves of the last dimension.
STACKS = ["separate", "kv-first", "blocks-first", "packed"]
SRC_VIEWS = ["contiguous", "heads-major", "padded-head-dim"]
# scatter_kv_layers: the whole-model cache as kvfast's storage [L, 2, nb, ...], or the other stacks, viewed.
LAYER_STACKS = ["storage", "kv-first", "blocks-first", "packed"]
NUM_LAYERS_LIST = [1, 3]
SEED = 0


# ===================================================================================================
# Backends and inputs
# ===================================================================================================
@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    kernels: object  # a module with scatter_kv, scatter_kv_layers, gather_kv
    device: torch.device


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    name = request.param
    if name.startswith("triton"):
        pytest.importorskip("triton")
        module = importlib.import_module("kvfast.kernels.paged_kv")
        if name == "triton-interpret" and type(module._scatter_kv_kernel).__name__ != "InterpretedFunction":
            # Imported before this module set TRITON_INTERPRET: decorate the kernels again, now interpreted.
            module = importlib.reload(module)
    elif name == "cuda-host":
        try:
            module = importlib.import_module("kvfast.kernels.cuda_host")
        except ImportError:
            pytest.skip("kvfast._C_cuda_host was not built (no C++ toolchain when kvfast was installed)")
    else:
        if cuda_kernels is None:
            pytest.skip("kvfast._C_cuda was not built (no nvcc when kvfast was installed)")
        module = cuda_kernels
    return Backend(name, module, torch.device("cpu" if name in ("triton-interpret", "cuda-host") else "cuda"))


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A CPU tensor of uniformly random bytes viewed as ``dtype``: every bit pattern, NaNs included."""
    size = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)


def index_view(index: torch.Tensor, view: str) -> torch.Tensor:
    """``index`` itself, or the same values as a stride-2 view whose neighbours are other valid entries (a kernel
    that read it as contiguous would write or read the wrong places, not fail)."""
    if view == "contiguous":
        return index
    assert view == "strided"
    return torch.stack((index, index.roll(1)), dim=1)[:, 0]


def random_slots(num_tokens: int, num_slots: int, gen: torch.Generator, pad_fraction: float = 0.2) -> torch.Tensor:
    """``[num_tokens]`` distinct slots in random blocks at random offsets, about ``pad_fraction`` of them -1."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    pad = torch.rand(num_tokens, generator=gen) < pad_fraction
    return torch.where(pad, torch.full_like(slots, -1), slots)


def page_shape(layout: str, block_size: int, num_heads: int, head_dim: int) -> tuple[int, int, int]:
    return (block_size, num_heads, head_dim) if layout == "NHD" else (num_heads, block_size, head_dim)


def make_layer_cache(stack: str, layout: str, num_blocks: int, block_size: int, num_heads: int, head_dim: int,
                     dtype: torch.dtype, gen: torch.Generator):
    """Random base tensors and a function from them (or copies) to one layer's ``(k_cache, v_cache)`` views."""
    page = page_shape(layout, block_size, num_heads, head_dim)
    if stack == "separate":  # two allocations
        return [random_bits((num_blocks, *page), dtype, gen) for _ in range(2)], lambda b: (b[0], b[1])
    if stack == "kv-first":
        return [random_bits((2, num_blocks, *page), dtype, gen)], lambda b: (b[0][0], b[0][1])
    if stack == "blocks-first":
        return [random_bits((num_blocks, 2, *page), dtype, gen)], lambda b: (b[0][:, 0], b[0][:, 1])
    assert stack == "packed"
    base = random_bits((num_blocks, *page[:-1], 2 * head_dim), dtype, gen)
    return [base], lambda b: (b[0][..., :head_dim], b[0][..., head_dim:])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality of the bytes (NaN == NaN when the bits are equal), shapes included."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.cpu().contiguous().view(torch.uint8), expected.cpu().contiguous().view(torch.uint8)
    if not torch.equal(a, e):
        where = (a != e).nonzero()
        raise AssertionError(f"{len(where)} bytes differ, first at {where[0].tolist()}")


# ===================================================================================================
# scatter_kv: one layer
# ===================================================================================================
def check_scatter(backend: Backend, *, dtype=DTYPE, head_dim=HEAD_DIM, num_heads=NUM_HEADS, block_size=BLOCK_SIZE,
                  layout="NHD", num_tokens=NUM_TOKENS, slot_dtype=torch.int64, stack="separate",
                  src_view="contiguous", pad_fraction=0.2, slot_view="contiguous") -> None:
    gen = torch.Generator().manual_seed(SEED)
    num_blocks = -(-num_tokens // block_size) + 3  # spare blocks: random slots land in a random block order
    base, views = make_layer_cache(stack, layout, num_blocks, block_size, num_heads, head_dim, dtype, gen)
    src_k, src_v = (_src(src_view, num_tokens, num_heads, head_dim, dtype, gen) for _ in range(2))
    slots = random_slots(num_tokens, num_blocks * block_size, gen, pad_fraction).to(slot_dtype)

    expected = [b.clone() for b in base]
    ops.scatter_kv(src_k, src_v, *views(expected), slots, layout=layout)

    actual = [b.to(backend.device) for b in base]
    k_cache, v_cache = views(actual)
    backend.kernels.scatter_kv(src_k.to(backend.device), src_v.to(backend.device), k_cache, v_cache,
                               index_view(slots.to(backend.device), slot_view), layout=layout)
    for a, e in zip(actual, expected):
        assert_same_bits(a, e)


def _src(view: str, num_tokens: int, num_heads: int, head_dim: int, dtype, gen) -> torch.Tensor:
    """``[num_tokens, H, D]`` source rows, contiguous or as a strided view with a contiguous last dimension."""
    if view == "contiguous":
        return random_bits((num_tokens, num_heads, head_dim), dtype, gen)
    if view == "heads-major":  # attention's [H, T, D] transposed, as hf.PagedCache hands it over
        return random_bits((num_heads, num_tokens, head_dim), dtype, gen).transpose(0, 1)
    assert view == "padded-head-dim"  # rows with a gap after each head
    return random_bits((num_tokens, num_heads, head_dim + 8), dtype, gen)[..., :head_dim]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_dtypes(backend, dtype):
    check_scatter(backend, dtype=dtype)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_scatter_head_dims(backend, head_dim):
    check_scatter(backend, head_dim=head_dim)


@pytest.mark.parametrize("num_heads", NUM_HEADS_LIST)
def test_scatter_num_heads(backend, num_heads):
    check_scatter(backend, num_heads=num_heads)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_scatter_block_sizes(backend, block_size):
    check_scatter(backend, block_size=block_size)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_layouts(backend, layout):
    check_scatter(backend, layout=layout)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS_LIST)
def test_scatter_num_tokens(backend, num_tokens):
    check_scatter(backend, num_tokens=num_tokens)


@pytest.mark.parametrize("slot_dtype", SLOT_DTYPES, ids=str)
def test_scatter_slot_dtypes(backend, slot_dtype):
    check_scatter(backend, slot_dtype=slot_dtype)


@pytest.mark.parametrize("stack", STACKS)
def test_scatter_stacks(backend, stack):
    # vLLM's packed pages are HND; the other stacks are checked in both layouts by their views' strides alone.
    check_scatter(backend, stack=stack, layout="HND" if stack == "packed" else "NHD")


@pytest.mark.parametrize("src_view", SRC_VIEWS)
def test_scatter_src_views(backend, src_view):
    check_scatter(backend, src_view=src_view)


def test_scatter_all_padding_writes_nothing(backend):
    check_scatter(backend, pad_fraction=1.0)


@pytest.mark.parametrize("slot_dtype", SLOT_DTYPES, ids=str)
@pytest.mark.parametrize("slot_view", INDEX_VIEWS)
def test_scatter_slot_views(backend, slot_view, slot_dtype):
    check_scatter(backend, slot_view=slot_view, slot_dtype=slot_dtype)


# ===================================================================================================
# scatter_kv_layers: a [L, 2, T, H, D] staging chunk into every layer at once
# ===================================================================================================
def make_model_cache(stack: str, layout: str, num_layers: int, num_blocks: int, block_size: int, num_heads: int,
                     head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """A random base tensor and a function from it to its ``[L, 2, num_blocks, *page]`` view."""
    page = page_shape(layout, block_size, num_heads, head_dim)
    if stack == "storage":  # PagedKVCache.storage
        return random_bits((num_layers, 2, num_blocks, *page), dtype, gen), lambda b: b
    if stack == "kv-first":
        return random_bits((2, num_layers, num_blocks, *page), dtype, gen), lambda b: b.transpose(0, 1)
    if stack == "blocks-first":
        return random_bits((num_layers, num_blocks, 2, *page), dtype, gen), lambda b: b.transpose(1, 2)
    assert stack == "packed"
    base = random_bits((num_layers, num_blocks, *page[:-1], 2 * head_dim), dtype, gen)
    return base, lambda b: b.unflatten(-1, (2, head_dim)).permute(0, 4, 1, 2, 3, 5)


def check_scatter_layers(backend: Backend, *, stack="storage", layout="NHD", num_layers=3, num_tokens=NUM_TOKENS,
                         staged_tokens=None, dtype=DTYPE) -> None:
    gen = torch.Generator().manual_seed(SEED)
    num_blocks = -(-num_tokens // BLOCK_SIZE) + 3
    base, view = make_model_cache(stack, layout, num_layers, num_blocks, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype, gen)
    # The staging buffer may hold more tokens than this chunk uses: src is then a strided slice of it.
    staging = random_bits((num_layers, 2, staged_tokens or num_tokens, NUM_HEADS, HEAD_DIM), dtype, gen)
    src = staging[:, :, :num_tokens]
    slots = random_slots(num_tokens, num_blocks * BLOCK_SIZE, gen)

    expected = base.clone()
    ops.scatter_kv_layers(src, view(expected), slots, layout=layout)

    actual = base.to(backend.device)
    backend.kernels.scatter_kv_layers(src.to(backend.device), view(actual), slots.to(backend.device), layout=layout)
    assert_same_bits(actual, expected)


@pytest.mark.parametrize("stack", LAYER_STACKS)
def test_scatter_layers_stacks(backend, stack):
    check_scatter_layers(backend, stack=stack, layout="HND" if stack == "packed" else "NHD")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scatter_layers_layouts(backend, layout):
    check_scatter_layers(backend, layout=layout)


@pytest.mark.parametrize("num_layers", NUM_LAYERS_LIST)
def test_scatter_layers_num_layers(backend, num_layers):
    check_scatter_layers(backend, num_layers=num_layers)


def test_scatter_layers_from_a_partly_filled_staging_buffer(backend):
    check_scatter_layers(backend, num_tokens=29, staged_tokens=64)


def test_scatter_layers_into_paged_cache_storage(backend):
    """The loader's call: a chunk of layers 1..2 of a PagedKVCache, equal to per-layer PagedKVCache.write."""
    gen = torch.Generator().manual_seed(SEED)
    cache = PagedKVCache(4, NUM_HEADS, HEAD_DIM, num_blocks=9, block_size=BLOCK_SIZE, dtype=DTYPE, layout="HND")
    reference = PagedKVCache(4, NUM_HEADS, HEAD_DIM, num_blocks=9, block_size=BLOCK_SIZE, dtype=DTYPE, layout="HND")
    for c in (cache, reference):
        c.append_slots(c.new_sequence(), 20)  # the document lands after another sequence's blocks
    slots = cache.append_slots(cache.new_sequence(), NUM_TOKENS)
    reference.append_slots(reference.new_sequence(), NUM_TOKENS)
    src = random_bits((2, 2, NUM_TOKENS, NUM_HEADS, HEAD_DIM), DTYPE, gen)
    for layer in (1, 2):
        reference.write(layer, slots, src[layer - 1, 0], src[layer - 1, 1])

    storage = cache.storage.to(backend.device)
    backend.kernels.scatter_kv_layers(src.to(backend.device), storage[1:3], slots.to(backend.device),
                                      layout=cache.layout)
    assert_same_bits(storage, reference.storage)


# ===================================================================================================
# gather_kv: a sequence's pages back to contiguous [num_tokens, H, D]
# ===================================================================================================
def check_gather(backend: Backend, *, dtype=DTYPE, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, layout="NHD",
                 num_tokens=NUM_TOKENS, stack="separate", table_dtype=torch.int64, table_view="contiguous") -> None:
    gen = torch.Generator().manual_seed(SEED)
    num_blocks = -(-num_tokens // block_size) + 3
    base, views = make_layer_cache(stack, layout, num_blocks, block_size, NUM_HEADS, head_dim, dtype, gen)
    # The sequence's blocks in random order, plus one unused entry past its end (tables are often longer).
    table = torch.randperm(num_blocks, generator=gen)[: -(-num_tokens // block_size) + 1].to(table_dtype)

    expected = ops.gather_kv(*views(base), table, num_tokens, layout=layout)
    device_base = [b.to(backend.device) for b in base]
    actual = backend.kernels.gather_kv(*views(device_base), index_view(table.to(backend.device), table_view),
                                       num_tokens, layout=layout)
    for a, e in zip(actual, expected):
        assert a.is_contiguous() and a.device.type == backend.device.type
        assert_same_bits(a, e)
    for a, e in zip(device_base, base):
        assert_same_bits(a, e)  # gather only reads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_dtypes(backend, dtype):
    check_gather(backend, dtype=dtype)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_gather_head_dims(backend, head_dim):
    check_gather(backend, head_dim=head_dim)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gather_block_sizes(backend, block_size):
    check_gather(backend, block_size=block_size)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_layouts(backend, layout):
    check_gather(backend, layout=layout)


@pytest.mark.parametrize("num_tokens", NUM_TOKENS_LIST)
def test_gather_num_tokens(backend, num_tokens):
    check_gather(backend, num_tokens=num_tokens)


@pytest.mark.parametrize("stack", STACKS)
def test_gather_stacks(backend, stack):
    check_gather(backend, stack=stack, layout="HND" if stack == "packed" else "NHD")


@pytest.mark.parametrize("table_dtype", SLOT_DTYPES, ids=str)
def test_gather_table_dtypes(backend, table_dtype):
    check_gather(backend, table_dtype=table_dtype)


@pytest.mark.parametrize("table_dtype", SLOT_DTYPES, ids=str)
@pytest.mark.parametrize("table_view", INDEX_VIEWS)
def test_gather_table_views(backend, table_view, table_dtype):
    check_gather(backend, table_view=table_view, table_dtype=table_dtype)


# ===================================================================================================
# Checks at the boundary: the wrappers refuse what the kernels would get wrong
# ===================================================================================================
def _valid_args(device: torch.device):
    k = torch.zeros(5, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    cache = torch.zeros(4, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    slots = torch.arange(5, device=device)
    return k, k.clone(), cache, cache.clone(), slots


BAD_SCATTER_ARGS: dict[str, tuple[Callable, type[Exception], str]] = {
    "dtype": (lambda a: (a[0].float(), a[1].float(), *a[2:]), TypeError, "never converts"),
    "head_dim-strided": (lambda a: (a[0], a[1], a[2].transpose(2, 3), a[3].transpose(2, 3), a[4]),
                         ValueError, "contiguous in head_dim"),
    "heads": (lambda a: (a[0][:, :2], a[1][:, :2], *a[2:]), ValueError, "kv_heads, head_dim"),
    "slots-length": (lambda a: (*a[:4], a[4][:3]), ValueError, "3 entries for 5 tokens"),
    "slots-dtype": (lambda a: (*a[:4], a[4].float()), ValueError, "int32 or int64"),
    "v-shape": (lambda a: (a[0], a[1], a[2], a[3][:2], a[4]), ValueError, "one NHD page shape"),
}


@pytest.mark.parametrize("bad", list(BAD_SCATTER_ARGS))
def test_scatter_refuses(backend, bad):
    change, error, message = BAD_SCATTER_ARGS[bad]
    with pytest.raises(error, match=message):
        backend.kernels.scatter_kv(*change(_valid_args(backend.device)), layout="NHD")


def test_scatter_layers_refuses_layer_mismatch(backend):
    src = torch.zeros(2, 2, 5, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=backend.device)
    cache = torch.zeros(3, 2, 4, BLOCK_SIZE, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=backend.device)
    with pytest.raises(ValueError, match="slice the cache's layers"):
        backend.kernels.scatter_kv_layers(src, cache, torch.arange(5, device=backend.device))


def test_gather_refuses_more_tokens_than_the_table_holds(backend):
    _, _, cache, _, _ = _valid_args(backend.device)
    with pytest.raises(ValueError, match="block table"):
        backend.kernels.gather_kv(cache, cache, torch.tensor([1, 2], device=backend.device), 2 * BLOCK_SIZE + 1)


# ===================================================================================================
# The CUDA extension itself (runs on machines without a GPU too)
# ===================================================================================================
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH, so kvfast._C_cuda is not built")
def test_cuda_extension_built_when_nvcc_is_on_path():
    assert importlib.util.find_spec("kvfast._C_cuda") is not None, \
        "nvcc is on PATH but kvfast._C_cuda is missing: reinstall with KVFAST_REQUIRE_NATIVE=1 to see the build error"
    assert _C_cuda is not None and _C_cuda.runtime_version() >= 11000  # imports without a driver (static cudart)


@pytest.mark.skipif(_C_cuda is None, reason="kvfast._C_cuda not built")
def test_cuda_empty_launch_touches_nothing():
    # Zero tokens never reach CUDA (not even the device guard): null pointers are fine, and it works without a GPU.
    assert _C_cuda.scatter_kv(0, 0, 0, 0, 0, 1, 0, 1, 8, 16, 2, (0, 8, 8), (0, 8, 8), (0, 128, 8, 8), (0, 128, 8, 8),
                              0, 0) == 0
    assert _C_cuda.gather_kv(0, 0, 0, 0, 0, 0, 1, 8, 16, 2, (128, 8, 8), (128, 8, 8), (8, 8), 0, 0) == 0


@pytest.mark.skipif(_C_cuda is None, reason="kvfast._C_cuda not built")
def test_cuda_launcher_refuses_bad_sizes():
    with pytest.raises(ValueError, match="elem_size"):
        _C_cuda.scatter_kv(0, 0, 0, 0, 0, 1, 1, 1, 8, 16, 3, (0, 8, 8), (0, 8, 8), (0, 128, 8, 8), (0, 128, 8, 8), 0,
                           0)


@pytest.mark.skipif(_C_cuda is None or HAS_CUDA or _C_cuda.device_count() > 0,
                    reason="needs kvfast._C_cuda and no GPU (the launch uses null pointers)")
def test_cuda_errors_name_the_failing_call():
    # Without a GPU (or driver) the launch's device guard fails, before any pointer is touched.
    with pytest.raises(RuntimeError, match=r"CUDA call cuda\w+.*failed: cudaError"):
        _C_cuda.scatter_kv(0, 0, 0, 0, 0, 1, 1, 1, 8, 16, 2, (0, 8, 8), (0, 8, 8), (0, 128, 8, 8), (0, 128, 8, 8), 0,
                           0)
    with pytest.raises(RuntimeError, match=r"CUDA call cuda\w+.*failed: cudaError"):
        _C_cuda.gather_kv(0, 0, 0, 0, 0, 1, 1, 8, 16, 2, (128, 8, 8), (128, 8, 8), (8, 8), 0, 0)


@pytest.mark.skipif(cuda_kernels is None, reason="kvfast._C_cuda not built")
def test_cuda_wrappers_refuse_cpu_tensors():
    with pytest.raises(ValueError, match="run on cuda tensors"):
        cuda_kernels.scatter_kv(*_valid_args(torch.device("cpu")))


# ===================================================================================================
# The choice of kernels, and PagedKVCache on a GPU
# ===================================================================================================
def test_cpu_caches_use_the_reference():
    assert paged_kernels("cpu") == ("torch", ops)


def test_kernel_override_is_checked(monkeypatch):
    monkeypatch.setenv("KVFAST_KERNELS", "fastest")
    with pytest.raises(ValueError, match="KVFAST_KERNELS"):
        paged_kernels("cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("forced", ["", "cuda", "triton", "torch"])
def test_paged_cache_on_gpu_matches_cpu(monkeypatch, forced):
    monkeypatch.setenv("KVFAST_KERNELS", forced)
    if forced == "cuda" and cuda_kernels is None:
        pytest.skip("kvfast._C_cuda not built")
    name, _ = paged_kernels("cuda")
    assert name == (forced or name) and name in ("cuda", "triton", "torch")
    gen = torch.Generator().manual_seed(SEED)
    caches = [PagedKVCache(2, NUM_HEADS, HEAD_DIM, num_blocks=8, block_size=BLOCK_SIZE, dtype=DTYPE, device=d)
              for d in ("cpu", "cuda")]
    k, v = random_bits((50, NUM_HEADS, HEAD_DIM), DTYPE, gen), random_bits((50, NUM_HEADS, HEAD_DIM), DTYPE, gen)
    for cache in caches:
        seq = cache.new_sequence()
        slots = cache.append_slots(seq, 50)
        cache.write(1, slots, k.to(cache.device), v.to(cache.device))
        got = cache.gather(seq, 1, 7, 45)
        assert_same_bits(got[0], k[7:45])
        assert_same_bits(got[1], v[7:45])
    assert_same_bits(caches[1].storage, caches[0].storage)


@pytest.mark.gpu
@needs_cuda
def test_scatter_layers_qwen3_4b_chunk(backend):
    """A real loader chunk: 36 layers x 256 tokens of Qwen3-4B's KV (8 heads x 128, bf16), HND and NHD alike."""
    gen = torch.Generator().manual_seed(SEED)
    for layout in LAYOUTS:
        base, view = make_model_cache("storage", layout, 36, 40, 16, 8, 128, torch.bfloat16, gen)
        src = random_bits((36, 2, 256, 8, 128), torch.bfloat16, gen)
        slots = random_slots(256, 40 * 16, gen, pad_fraction=0.0)
        expected = base.clone()
        ops.scatter_kv_layers(src, view(expected), slots, layout=layout)
        actual = base.to(backend.device)
        backend.kernels.scatter_kv_layers(src.to(backend.device), view(actual), slots.to(backend.device),
                                          layout=layout)
        assert_same_bits(actual, expected)


@pytest.mark.gpu
@needs_cuda
def test_scatter_beyond_2_31_elements(backend):
    """Offsets past 2**31 elements (a 4.6 GB layer) must not wrap: 64-bit index arithmetic."""
    gen = torch.Generator().manual_seed(SEED)
    num_blocks = 140_000  # x 16 x 8 x 128 bf16 = 2.3e9 elements per cache
    if torch.cuda.mem_get_info()[0] < 12e9:
        pytest.skip("needs 10 GB of free GPU memory for two 4.6 GB caches")
    k_cache = torch.zeros(num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k_src, v_src = (random_bits((64, 8, 128), torch.bfloat16, gen).cuda() for _ in range(2))
    slots = torch.arange((num_blocks - 4) * 16, num_blocks * 16, device="cuda")  # the last 4 blocks
    backend.kernels.scatter_kv(k_src, v_src, k_cache, v_cache, slots)
    assert_same_bits(k_cache[num_blocks - 4:].reshape(64, 8, 128), k_src)
    assert_same_bits(v_cache[num_blocks - 4:].reshape(64, 8, 128), v_src)
    k, v = backend.kernels.gather_kv(k_cache, v_cache, torch.arange(num_blocks - 4, num_blocks, device="cuda"), 64)
    assert_same_bits(k, k_src)
    assert_same_bits(v, v_src)
    del k_cache, v_cache
    torch.cuda.empty_cache()
