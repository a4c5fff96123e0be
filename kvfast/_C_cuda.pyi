"""Type stubs for kvfast._C_cuda, the CUDA kernels built from csrc/cuda/ when nvcc is found.

Raw interface: device pointers, strides (in elements of the KV dtype), the device index and the stream are ints;
launches run on ``device`` (made current for the call, then restored; ``stream`` 0 is that device's legacy default
stream) and are asynchronous on ``stream``. Use the checked torch wrappers in ``kvfast.kernels.cuda`` instead of
calling these directly. Errors raise RuntimeError naming the failing CUDA call; bad sizes raise ValueError.
``kvfast._C_cuda_host`` has the same ``scatter_kv`` and ``gather_kv``, run on the CPU.
"""
import numpy as np

def scatter_kv(
    src_k: int,  # [num_layers, num_tokens, num_heads, head_dim]
    src_v: int,  # [num_layers, num_tokens, num_heads, head_dim]
    k_cache: int,  # [num_layers, num_blocks, *page]
    v_cache: int,  # [num_layers, num_blocks, *page]
    slot_mapping: int,  # [num_tokens] int64, -1 skips
    num_layers: int,
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    block_size: int,
    elem_size: int,
    src_k_strides: tuple[int, int, int],  # (layer, token, head)
    src_v_strides: tuple[int, int, int],
    k_cache_strides: tuple[int, int, int, int],  # (layer, block, page, head)
    v_cache_strides: tuple[int, int, int, int],
    device: int,
    stream: int,
) -> int:
    """Scatter ``num_layers x num_tokens`` rows into paged caches in one launch; returns the copy word in bytes
    (16, 8, 4, 2 or the element size; 0 when there was nothing to copy and no CUDA call was made)."""

def gather_kv(
    k_cache: int,  # [num_blocks, *page]
    v_cache: int,  # [num_blocks, *page]
    block_table: int,  # [>= ceil(num_tokens / block_size)] int64
    out_k: int,  # [num_tokens, num_heads, head_dim]
    out_v: int,  # [num_tokens, num_heads, head_dim]
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    block_size: int,
    elem_size: int,
    k_cache_strides: tuple[int, int, int],  # (block, page, head)
    v_cache_strides: tuple[int, int, int],
    out_strides: tuple[int, int],  # (token, head)
    device: int,
    stream: int,
) -> int:
    """Gather a sequence's first ``num_tokens`` tokens out of its pages in one launch; returns the copy word."""

def device_count() -> int:
    """CUDA devices this module's runtime sees; 0 without a driver or a GPU (never raises)."""

def runtime_version() -> int:
    """The CUDA runtime version linked in (statically), e.g. ``13000`` for 13.0."""

def driver_version() -> int:
    """The installed driver's CUDA version, e.g. ``13000``; 0 without a driver (never raises)."""

def staging_pool_stats(device: int) -> dict[str, int]:
    """The pinned staging pool of ``device`` that GPU loads reuse: ``allocations`` (ever made), ``cached_buffers``,
    ``cached_bytes`` (idle, ready for the next load) and ``in_use``."""

def trim_staging_pool(device: int) -> None:
    """Free every idle staging buffer of ``device`` (this waits for the device, as cudaFree does)."""

class GpuLoadJob:
    """A load of .kvf chunks into a GPU's paged K/V pages (csrc/cuda/gpu_sink.h); kvfast.loader._GpuJob drives it."""

    method: str
    threads: int

    def __init__(
        self,
        fd: int,
        chunks: np.ndarray,  # [n, 7] int64: index, layer, start, stop, offset, length, crc32c
        k_pages: list[int],  # [num_layers] device addresses
        v_pages: list[int],
        layout: tuple[int, int, int, int, int, int, int],  # num_blocks, block_size, H, head_bytes, byte strides
        elem_size: int,
        block_table: np.ndarray,  # [>= ceil(num_tokens / block_size)] int64
        num_tokens: int,
        device: int,
        *,
        stream: int = 0,  # the caller's current stream on `device`: the load's writes start after its queued work
        method: str = "scatter",
        read: str = "preadv",
        threads: int = 2,
        verify: bool = True,
        piece_bytes: int = 256 << 10,
        ring_slots: int = 3,
    ) -> None: ...
    def layer_ready(self, layer: int) -> bool: ...
    def wait_layer(self, layer: int, timeout: float = -1.0) -> bool: ...
    def stream_wait_layer(self, layer: int, stream: int) -> bool: ...
    def wait(self, timeout: float = -1.0) -> bool: ...
    def finished(self) -> bool: ...
    def error(self) -> tuple[str, int, int, int, str] | None: ...
    def cancel(self) -> None: ...
