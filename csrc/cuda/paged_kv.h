// kvfast CUDA paged-cache kernels: the host-side API.
//
// Launchers take raw device pointers, strides and a stream, so the Python wrappers (kvfast/kernels/cuda.py,
// through kvfast._C_cuda) and a C++ load pipeline call the same code. They are asynchronous on `stream`, do not
// synchronize, and throw std::runtime_error naming the failing CUDA call.
//
// Conventions (the same as the Triton kernels in kernels/paged_kv.py and the references in kvfast/ops.py):
//   - Strides are in elements of the KV dtype, as torch reports them; only head_dim must be contiguous.
//   - A cache page is addressed by (block, page, head) strides: NHD [num_blocks, block_size, H, D] and
//     HND [num_blocks, H, block_size, D] differ only in which stride is `page`, so one kernel serves both and
//     every stacked or packed view of them.
//   - The kernels copy bits (`elem_size` bytes per element, any dtype), so the copy is exact by construction.
//   - Preconditions, checked by the wrappers, not here: shapes agree, slots are -1 or < num_blocks * block_size,
//     block-table entries are < num_blocks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kvfast {
namespace cuda {

// Source rows [num_layers, num_tokens, num_heads, head_dim].
struct SrcStrides {
  int64_t layer;
  int64_t token;
  int64_t head;
};

// Cache [num_layers, num_blocks, *page]; `page` is the stride between tokens of one block.
struct CacheStrides {
  int64_t layer;
  int64_t block;
  int64_t page;
  int64_t head;
};

struct ScatterArgs {
  const void* src_k;             // [num_layers, num_tokens, num_heads, head_dim], strides src_k_strides
  const void* src_v;             // [num_layers, num_tokens, num_heads, head_dim], strides src_v_strides
  void* k_cache;                 // [num_layers, num_blocks, *page], strides k_cache_strides
  void* v_cache;                 // [num_layers, num_blocks, *page], strides v_cache_strides
  const int64_t* slot_mapping;   // [num_tokens], block_idx * block_size + block_offset, or -1 (skip)
  int64_t num_layers;            // <= 65535 (grid y)
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t elem_size;             // bytes per element: 1, 2, 4 or 8
  SrcStrides src_k_strides;
  SrcStrides src_v_strides;
  CacheStrides k_cache_strides;
  CacheStrides v_cache_strides;
};

// Writes every layer's token i to slot slot_mapping[i] (vLLM's reshape_and_cache_flash, for many layers at
// once). One launch; the grid is (num_tokens, num_layers).
void scatter_kv(const ScatterArgs& args, cudaStream_t stream);

// Cache page addressing of one layer, for gather.
struct PageStrides {
  int64_t block;
  int64_t page;
  int64_t head;
};

struct GatherArgs {
  const void* k_cache;           // [num_blocks, *page], strides k_cache_strides
  const void* v_cache;           // [num_blocks, *page], strides v_cache_strides
  const int64_t* block_table;    // [>= ceil(num_tokens / block_size)], the sequence's blocks in order
  void* out_k;                   // [num_tokens, num_heads, head_dim], strides (out_token_stride, out_head_stride, 1)
  void* out_v;                   // [num_tokens, num_heads, head_dim], same strides as out_k
  int64_t num_tokens;
  int64_t num_heads;
  int64_t head_dim;
  int64_t block_size;
  int64_t elem_size;
  PageStrides k_cache_strides;
  PageStrides v_cache_strides;
  int64_t out_token_stride;
  int64_t out_head_stride;
};

// Copies tokens [0, num_tokens) of a sequence out of its pages, in order. One launch; the grid is num_tokens.
void gather_kv(const GatherArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace kvfast
