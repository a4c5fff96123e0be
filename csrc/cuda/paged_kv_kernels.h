// kvfast paged-cache kernels: their argument structs, launch planning and per-CTA bodies, free of CUDA.
//
// Everything here compiles twice: by nvcc into the kernels of paged_kv.cu, and by the host compiler into the
// emulation of host_emulation.cpp (kvfast._C_cuda_host), which runs the same bodies over the same grid with a
// loop per blockIdx and threadIdx. So the index math the GPU runs is the math CI tests on the CPU, against the
// PyTorch reference (tests/test_kernels.py, backend "cuda-host").
//
// Conventions (the same as the Triton kernels in kernels/paged_kv.py and the references in kvfast/cache/ops.py):
//   - Strides are in elements of the KV dtype, as torch reports them; only head_dim must be contiguous.
//   - A cache page is addressed by (block, page, head) strides: NHD [num_blocks, block_size, H, D] and
//     HND [num_blocks, H, block_size, D] differ only in which stride is `page`, so one kernel serves both and
//     every stacked or packed view of them.
//   - The kernels copy bits in the widest word that every address allows (16, 8, 4, 2 bytes or one element):
//     integers, never floats, so every bit is kept, NaN payloads included.
//   - Preconditions, checked by the wrappers, not here: shapes agree, slots are -1 or < num_blocks * block_size,
//     block-table entries are < num_blocks. Index products are 64-bit: a cache passes 2**31 elements easily.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define KVF_HOST_DEVICE __host__ __device__
#else
#define KVF_HOST_DEVICE
#endif

namespace kvfast {
namespace cuda {

// ===================================================================================================
// Arguments, in elements (what the launchers take)
// ===================================================================================================
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
  const int64_t* slot_mapping;   // [num_tokens] contiguous, block_idx * block_size + block_offset, or -1 (skip)
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

// Cache page addressing of one layer, for gather.
struct PageStrides {
  int64_t block;
  int64_t page;
  int64_t head;
};

struct GatherArgs {
  const void* k_cache;           // [num_blocks, *page], strides k_cache_strides
  const void* v_cache;           // [num_blocks, *page], strides v_cache_strides
  const int64_t* block_table;    // [>= ceil(num_tokens / block_size)] contiguous, the sequence's blocks in order
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

// ===================================================================================================
// Copy words: the device's vector types, and host types of the same size and alignment
// ===================================================================================================
#if defined(__CUDACC__)
using Word16 = uint4;  // one 128-bit load and store per thread
using Word8 = uint2;
#else
struct alignas(16) Word16 {
  uint32_t x, y, z, w;
};
struct alignas(8) Word8 {
  uint32_t x, y;
};
#endif

// Calls fn(Word{}) with the copy type of `word_bytes` bytes.
template <class Fn>
void dispatch_word(int64_t word_bytes, Fn&& fn) {
  switch (word_bytes) {
    case 16: return fn(Word16{});
    case 8: return fn(Word8{});
    case 4: return fn(uint32_t{});
    case 2: return fn(uint16_t{});
    default: return fn(uint8_t{});
  }
}

// ===================================================================================================
// Launch planning: check the sizes, pick the word, convert strides to words
// ===================================================================================================
constexpr int kMaxThreads = 256;  // threads per CTA: one CTA copies one token's row of K and V
constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// How one launch runs: the copy word and the CTA size.
struct LaunchPlan {
  int64_t word_bytes = 0;  // 16, 8, 4, 2 or elem_size
  int64_t scale = 0;       // elements per word
  int threads = 0;         // per CTA: a warp multiple covering one row of words, at most kMaxThreads
};

inline int threads_for(int64_t row_words) {
  const int64_t rounded = (row_words + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(rounded < kMaxThreads ? rounded : kMaxThreads);
}

// The widest word that divides the row (head_dim bytes), every stride in bytes and every base address.
inline int64_t copy_word_bytes(int64_t elem_size, int64_t head_dim, std::initializer_list<const void*> pointers,
                               std::initializer_list<int64_t> strides) {
  for (int64_t word = 16; word > elem_size; word /= 2) {
    bool fits = (head_dim * elem_size) % word == 0;
    for (const void* p : pointers) fits = fits && reinterpret_cast<uintptr_t>(p) % word == 0;
    for (int64_t s : strides) fits = fits && (s * elem_size) % word == 0;
    if (fits) return word;
  }
  return elem_size;
}

// A dimension of size 1 is never stepped over; its stride (which a view may leave arbitrary) must not narrow
// the word, so it is zeroed before the word is chosen.
inline int64_t used_stride(int64_t size, int64_t stride) { return size > 1 ? stride : 0; }

inline void check_common(int64_t elem_size, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                         int64_t block_size) {
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) {
    throw std::invalid_argument("kvfast: elem_size must be 1, 2, 4 or 8 bytes, got " + std::to_string(elem_size));
  }
  if (num_tokens > kMaxGridX) {
    throw std::invalid_argument("kvfast: at most 2**31 - 1 tokens per launch, got " + std::to_string(num_tokens));
  }
  if (num_heads < 1 || head_dim < 1 || block_size < 1 || num_heads * head_dim > kMaxGridX) {
    throw std::invalid_argument("kvfast: num_heads, head_dim and block_size must be positive (and a row below "
                                "2**31 elements)");
  }
}

// Checks *a, zeroes its unused strides and plans the launch. False: nothing to copy (an empty grid is a launch
// error, so the launcher returns before CUDA sees it). Throws std::invalid_argument on bad sizes.
inline bool plan_scatter(ScatterArgs* a, LaunchPlan* plan) {
  if (a->num_tokens <= 0 || a->num_layers <= 0) return false;
  check_common(a->elem_size, a->num_tokens, a->num_heads, a->head_dim, a->block_size);
  if (a->num_layers > kMaxGridY) {
    throw std::invalid_argument("kvfast: at most 65535 layers per launch, got " + std::to_string(a->num_layers));
  }
  for (SrcStrides* s : {&a->src_k_strides, &a->src_v_strides}) {
    *s = {used_stride(a->num_layers, s->layer), used_stride(a->num_tokens, s->token),
          used_stride(a->num_heads, s->head)};
  }
  for (CacheStrides* s : {&a->k_cache_strides, &a->v_cache_strides}) {
    *s = {used_stride(a->num_layers, s->layer), s->block, used_stride(a->block_size, s->page),
          used_stride(a->num_heads, s->head)};
  }
  plan->word_bytes = copy_word_bytes(
      a->elem_size, a->head_dim, {a->src_k, a->src_v, a->k_cache, a->v_cache},
      {a->src_k_strides.layer, a->src_k_strides.token, a->src_k_strides.head,
       a->src_v_strides.layer, a->src_v_strides.token, a->src_v_strides.head,
       a->k_cache_strides.layer, a->k_cache_strides.block, a->k_cache_strides.page, a->k_cache_strides.head,
       a->v_cache_strides.layer, a->v_cache_strides.block, a->v_cache_strides.page, a->v_cache_strides.head});
  plan->scale = plan->word_bytes / a->elem_size;
  plan->threads = threads_for(a->num_heads * (a->head_dim / plan->scale));
  return true;
}

// As plan_scatter, for a gather.
inline bool plan_gather(GatherArgs* a, LaunchPlan* plan) {
  if (a->num_tokens <= 0) return false;
  check_common(a->elem_size, a->num_tokens, a->num_heads, a->head_dim, a->block_size);
  for (PageStrides* s : {&a->k_cache_strides, &a->v_cache_strides}) {
    *s = {s->block, used_stride(a->block_size, s->page), used_stride(a->num_heads, s->head)};
  }
  a->out_token_stride = used_stride(a->num_tokens, a->out_token_stride);
  a->out_head_stride = used_stride(a->num_heads, a->out_head_stride);
  plan->word_bytes = copy_word_bytes(
      a->elem_size, a->head_dim, {a->k_cache, a->v_cache, a->out_k, a->out_v},
      {a->k_cache_strides.block, a->k_cache_strides.page, a->k_cache_strides.head, a->v_cache_strides.block,
       a->v_cache_strides.page, a->v_cache_strides.head, a->out_token_stride, a->out_head_stride});
  plan->scale = plan->word_bytes / a->elem_size;
  plan->threads = threads_for(a->num_heads * (a->head_dim / plan->scale));
  return true;
}

// ===================================================================================================
// Kernel geometry, in words (what every CTA reads besides the four data pointers)
// ===================================================================================================
struct ScatterGeometry {
  const int64_t* slot_mapping;   // [num_tokens]
  int num_heads;
  int head_words;                // words per head row
  int64_t block_size;
  SrcStrides src_k;              // in words, as every stride below
  SrcStrides src_v;
  CacheStrides k_cache;
  CacheStrides v_cache;
};

struct GatherGeometry {
  const int64_t* block_table;    // [>= ceil(num_tokens / block_size)]
  int num_heads;
  int head_words;
  int64_t block_size;
  PageStrides k_cache;           // in words, as every stride below
  PageStrides v_cache;
  int64_t out_token_stride;
  int64_t out_head_stride;
};

// Strides in elements -> strides in words of `scale` elements (exact: the word divides every used stride).
inline SrcStrides in_words(const SrcStrides& s, int64_t scale) {
  return {s.layer / scale, s.token / scale, s.head / scale};
}
inline CacheStrides in_words(const CacheStrides& s, int64_t scale) {
  return {s.layer / scale, s.block / scale, s.page / scale, s.head / scale};
}
inline PageStrides in_words(const PageStrides& s, int64_t scale) {
  return {s.block / scale, s.page / scale, s.head / scale};
}

inline ScatterGeometry scatter_geometry(const ScatterArgs& a, const LaunchPlan& plan) {
  return {a.slot_mapping, static_cast<int>(a.num_heads), static_cast<int>(a.head_dim / plan.scale), a.block_size,
          in_words(a.src_k_strides, plan.scale), in_words(a.src_v_strides, plan.scale),
          in_words(a.k_cache_strides, plan.scale), in_words(a.v_cache_strides, plan.scale)};
}

inline GatherGeometry gather_geometry(const GatherArgs& a, const LaunchPlan& plan) {
  return {a.block_table, static_cast<int>(a.num_heads), static_cast<int>(a.head_dim / plan.scale), a.block_size,
          in_words(a.k_cache_strides, plan.scale), in_words(a.v_cache_strides, plan.scale),
          a.out_token_stride / plan.scale, a.out_head_stride / plan.scale};
}

// ===================================================================================================
// The bodies: what CTA (token_idx, layer_idx) does, as thread `thread` of `num_threads`
// ===================================================================================================
// Scatter: src[layer, token, head, :] -> cache[layer, block_idx, (block_offset, head) by strides, :]
template <typename Word>
KVF_HOST_DEVICE inline void scatter_kv_cta(
    const Word* __restrict__ src_k,  // [num_layers, num_tokens, num_heads, head_words]
    const Word* __restrict__ src_v,  // [num_layers, num_tokens, num_heads, head_words]
    Word* __restrict__ k_cache,      // [num_layers, num_blocks, *page]
    Word* __restrict__ v_cache,      // [num_layers, num_blocks, *page]
    const ScatterGeometry& g, int64_t token_idx, int64_t layer_idx, int thread, int num_threads) {
  const int64_t slot_idx = g.slot_mapping[token_idx];
  // Padding first: a -1 slot must never reach the division below, where it would name block 0, offset -1.
  if (slot_idx < 0) return;
  const int64_t block_idx = slot_idx / g.block_size;
  const int64_t block_offset = slot_idx % g.block_size;

  const Word* src_k_row = src_k + layer_idx * g.src_k.layer + token_idx * g.src_k.token;
  const Word* src_v_row = src_v + layer_idx * g.src_v.layer + token_idx * g.src_v.token;
  Word* k_slot = k_cache + layer_idx * g.k_cache.layer + block_idx * g.k_cache.block + block_offset * g.k_cache.page;
  Word* v_slot = v_cache + layer_idx * g.v_cache.layer + block_idx * g.v_cache.block + block_offset * g.v_cache.page;

  const int row_words = g.num_heads * g.head_words;
  for (int i = thread; i < row_words; i += num_threads) {
    const int64_t head_idx = i / g.head_words;  // 64-bit: head_idx * head stride passes 2**31 in strided views
    const int64_t word_idx = i - head_idx * g.head_words;
    k_slot[head_idx * g.k_cache.head + word_idx] = src_k_row[head_idx * g.src_k.head + word_idx];
    v_slot[head_idx * g.v_cache.head + word_idx] = src_v_row[head_idx * g.src_v.head + word_idx];
  }
}

// Gather: cache[block_table[t / block_size], t % block_size, head, :] -> out[t, head, :]
template <typename Word>
KVF_HOST_DEVICE inline void gather_kv_cta(
    const Word* __restrict__ k_cache,  // [num_blocks, *page]
    const Word* __restrict__ v_cache,  // [num_blocks, *page]
    Word* __restrict__ out_k,          // [num_tokens, num_heads, head_words]
    Word* __restrict__ out_v,          // [num_tokens, num_heads, head_words]
    const GatherGeometry& g, int64_t token_idx, int thread, int num_threads) {
  const int64_t block_idx = g.block_table[token_idx / g.block_size];
  const int64_t block_offset = token_idx % g.block_size;

  const Word* k_slot = k_cache + block_idx * g.k_cache.block + block_offset * g.k_cache.page;
  const Word* v_slot = v_cache + block_idx * g.v_cache.block + block_offset * g.v_cache.page;
  Word* out_k_row = out_k + token_idx * g.out_token_stride;
  Word* out_v_row = out_v + token_idx * g.out_token_stride;

  const int row_words = g.num_heads * g.head_words;
  for (int i = thread; i < row_words; i += num_threads) {
    const int64_t head_idx = i / g.head_words;
    const int64_t word_idx = i - head_idx * g.head_words;
    out_k_row[head_idx * g.out_head_stride + word_idx] = k_slot[head_idx * g.k_cache.head + word_idx];
    out_v_row[head_idx * g.out_head_stride + word_idx] = v_slot[head_idx * g.v_cache.head + word_idx];
  }
}

}  // namespace cuda
}  // namespace kvfast
