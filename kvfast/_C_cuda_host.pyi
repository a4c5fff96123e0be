"""Type stubs for kvfast._C_cuda_host: csrc/cuda/'s kernels and GPU-sink arithmetic compiled for the CPU (tests).

``scatter_kv`` and ``gather_kv`` take exactly ``kvfast._C_cuda``'s arguments (see its stubs), with host addresses
for the pointers; ``device`` and ``stream`` are ignored. Each launch runs every CTA of the grid and every thread
of a CTA in turn, with the device code's own index math and copy word. Use ``kvfast.kernels.cuda_host``.
"""
import numpy as np

def scatter_kv(
    src_k: int,
    src_v: int,
    k_cache: int,
    v_cache: int,
    slot_mapping: int,
    num_layers: int,
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    block_size: int,
    elem_size: int,
    src_k_strides: tuple[int, int, int],
    src_v_strides: tuple[int, int, int],
    k_cache_strides: tuple[int, int, int, int],
    v_cache_strides: tuple[int, int, int, int],
    device: int,
    stream: int,
) -> int:
    """kvfast._C_cuda.scatter_kv on host memory; returns the copy word in bytes (0: nothing to copy)."""

def gather_kv(
    k_cache: int,
    v_cache: int,
    block_table: int,
    out_k: int,
    out_v: int,
    num_tokens: int,
    num_heads: int,
    head_dim: int,
    block_size: int,
    elem_size: int,
    k_cache_strides: tuple[int, int, int],
    v_cache_strides: tuple[int, int, int],
    out_strides: tuple[int, int],
    device: int,
    stream: int,
) -> int:
    """kvfast._C_cuda.gather_kv on host memory; returns the copy word in bytes."""

def sink_chunk(
    method: str,  # "scatter" or "dma"
    chunk: tuple[int, int, int, int, int, int, int],  # index, layer, start, stop, offset, length, crc32c
    staging: int,  # the chunk's stored bytes (K rows then V rows), already read and checked
    k_pages: int,  # layer's K pages (host address)
    v_pages: int,
    layout: tuple[int, int, int, int, int, int, int],  # as GpuLoadJob's
    elem_size: int,
    block_table: np.ndarray,
    num_tokens: int,
) -> int:
    """What GpuSink enqueues for one chunk, done on the host; returns the copies (kernel launches or DMA runs)."""
