"""Type stubs for kvfast._C_cuda, the CUDA kernels built from csrc/cuda/ when nvcc is found.

Raw interface: device pointers, strides (in elements of the KV dtype) and the stream are ints; calls are
asynchronous on ``stream``. Use the checked torch wrappers in ``kvfast.kernels.cuda`` instead of calling these
directly. Errors raise RuntimeError naming the failing CUDA call; bad sizes raise ValueError.
"""

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
    stream: int,
) -> None:
    """Scatter ``num_layers x num_tokens`` rows into paged caches in one launch."""

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
    stream: int,
) -> None:
    """Gather a sequence's first ``num_tokens`` tokens out of its pages in one launch."""

def device_count() -> int:
    """CUDA devices this module's runtime sees; 0 without a driver or a GPU (never raises)."""

def runtime_version() -> int:
    """The CUDA runtime version linked in (statically), e.g. ``13000`` for 13.0."""
