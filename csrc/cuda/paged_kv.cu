// kvfast CUDA paged-cache kernels: scatter tokens into pages (many layers per launch), gather a sequence back.
//
// Plain copies driven by strides (see paged_kv.h). The one idea beyond that: copy in the widest word that every
// address allows. Strides and pointers are in elements of the KV dtype; the launcher finds the largest word
// (16, 8, 4, 2 bytes, or one element) that divides head_dim's bytes, every stride's bytes and every base
// pointer, and instantiates the kernel for it, so a bf16 row of 128 is 16 uint4 loads and stores. Copying
// integers (never floats) keeps every bit, NaN payloads included.
#include "paged_kv.h"

#include <cuda_runtime.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

namespace kvfast {
namespace cuda {
namespace {

// ===================================================================================================
// Errors: every CUDA call is checked and named
// ===================================================================================================
void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("kvfast: CUDA call ") + call + " failed: " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
}

// Threads per CTA: one CTA copies one token's row of num_heads * head_words words for K and V.
constexpr int kMaxThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

int threads_for(int64_t row_words) {
  const int64_t rounded = (row_words + kWarp - 1) / kWarp * kWarp;
  return static_cast<int>(rounded < kMaxThreads ? rounded : kMaxThreads);
}

// ===================================================================================================
// Scatter: src[layer, token, head, :] -> cache[layer, block_idx, (block_offset, head) by strides, :]
// ===================================================================================================
template <typename Word>
__global__ void scatter_kv_kernel(
    const Word* __restrict__ src_k,           // [num_layers, num_tokens, num_heads, head_words]
    const Word* __restrict__ src_v,           // [num_layers, num_tokens, num_heads, head_words]
    Word* __restrict__ k_cache,               // [num_layers, num_blocks, *page]
    Word* __restrict__ v_cache,               // [num_layers, num_blocks, *page]
    const int64_t* __restrict__ slot_mapping, // [num_tokens]
    int num_heads, int head_words, int64_t block_size,
    SrcStrides src_k_strides, SrcStrides src_v_strides,  // in words
    CacheStrides k_strides, CacheStrides v_strides) {    // in words
  const int64_t token_idx = blockIdx.x;
  const int64_t layer_idx = blockIdx.y;
  const int64_t slot_idx = slot_mapping[token_idx];
  // Padding first: a -1 slot must never reach the division below, where it would name block 0, offset -1.
  if (slot_idx < 0) return;
  const int64_t block_idx = slot_idx / block_size;
  const int64_t block_offset = slot_idx % block_size;

  const Word* src_k_row = src_k + layer_idx * src_k_strides.layer + token_idx * src_k_strides.token;
  const Word* src_v_row = src_v + layer_idx * src_v_strides.layer + token_idx * src_v_strides.token;
  Word* k_slot = k_cache + layer_idx * k_strides.layer + block_idx * k_strides.block + block_offset * k_strides.page;
  Word* v_slot = v_cache + layer_idx * v_strides.layer + block_idx * v_strides.block + block_offset * v_strides.page;

  const int row_words = num_heads * head_words;
  for (int i = threadIdx.x; i < row_words; i += blockDim.x) {
    const int head_idx = i / head_words;
    const int word_idx = i - head_idx * head_words;
    k_slot[head_idx * k_strides.head + word_idx] = src_k_row[head_idx * src_k_strides.head + word_idx];
    v_slot[head_idx * v_strides.head + word_idx] = src_v_row[head_idx * src_v_strides.head + word_idx];
  }
}

// ===================================================================================================
// Gather: cache[block_table[t / block_size], t % block_size, head, :] -> out[t, head, :]
// ===================================================================================================
template <typename Word>
__global__ void gather_kv_kernel(
    const Word* __restrict__ k_cache,         // [num_blocks, *page]
    const Word* __restrict__ v_cache,         // [num_blocks, *page]
    const int64_t* __restrict__ block_table,  // [>= ceil(num_tokens / block_size)]
    Word* __restrict__ out_k,                 // [num_tokens, num_heads, head_words]
    Word* __restrict__ out_v,                 // [num_tokens, num_heads, head_words]
    int num_heads, int head_words, int64_t block_size,
    PageStrides k_strides, PageStrides v_strides,       // in words
    int64_t out_token_stride, int64_t out_head_stride) {  // in words
  const int64_t token_idx = blockIdx.x;
  const int64_t block_idx = block_table[token_idx / block_size];
  const int64_t block_offset = token_idx % block_size;

  const Word* k_slot = k_cache + block_idx * k_strides.block + block_offset * k_strides.page;
  const Word* v_slot = v_cache + block_idx * v_strides.block + block_offset * v_strides.page;
  Word* out_k_row = out_k + token_idx * out_token_stride;
  Word* out_v_row = out_v + token_idx * out_token_stride;

  const int row_words = num_heads * head_words;
  for (int i = threadIdx.x; i < row_words; i += blockDim.x) {
    const int head_idx = i / head_words;
    const int word_idx = i - head_idx * head_words;
    out_k_row[head_idx * out_head_stride + word_idx] = k_slot[head_idx * k_strides.head + word_idx];
    out_v_row[head_idx * out_head_stride + word_idx] = v_slot[head_idx * v_strides.head + word_idx];
  }
}

// ===================================================================================================
// Launchers: pick the copy word, convert strides to words, launch, check
// ===================================================================================================
// The widest word that divides the row (head_dim bytes), every stride in bytes and every base address.
int64_t copy_word_bytes(int64_t elem_size, int64_t head_dim, std::initializer_list<const void*> pointers,
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
int64_t used_stride(int64_t size, int64_t stride) { return size > 1 ? stride : 0; }

void check_common(int64_t elem_size, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size) {
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

// Strides in elements -> strides in words of `scale` elements (exact: the word divides every used stride).
SrcStrides in_words(const SrcStrides& s, int64_t scale) { return {s.layer / scale, s.token / scale, s.head / scale}; }
CacheStrides in_words(const CacheStrides& s, int64_t scale) {
  return {s.layer / scale, s.block / scale, s.page / scale, s.head / scale};
}
PageStrides in_words(const PageStrides& s, int64_t scale) { return {s.block / scale, s.page / scale, s.head / scale}; }

template <typename Word>
void launch_scatter(const ScatterArgs& a, int64_t word_bytes, cudaStream_t stream) {
  const int64_t scale = word_bytes / a.elem_size;  // elements per word
  const int head_words = static_cast<int>(a.head_dim / scale);
  const dim3 grid(static_cast<unsigned>(a.num_tokens), static_cast<unsigned>(a.num_layers));
  const dim3 block(threads_for(a.num_heads * head_words));
  scatter_kv_kernel<Word><<<grid, block, 0, stream>>>(
      static_cast<const Word*>(a.src_k), static_cast<const Word*>(a.src_v), static_cast<Word*>(a.k_cache),
      static_cast<Word*>(a.v_cache), a.slot_mapping, static_cast<int>(a.num_heads), head_words, a.block_size,
      in_words(a.src_k_strides, scale), in_words(a.src_v_strides, scale), in_words(a.k_cache_strides, scale),
      in_words(a.v_cache_strides, scale));
  check_cuda(cudaGetLastError(), "scatter_kv_kernel<<<>>> (kernel launch)");
}

template <typename Word>
void launch_gather(const GatherArgs& a, int64_t word_bytes, cudaStream_t stream) {
  const int64_t scale = word_bytes / a.elem_size;
  const int head_words = static_cast<int>(a.head_dim / scale);
  const dim3 grid(static_cast<unsigned>(a.num_tokens));
  const dim3 block(threads_for(a.num_heads * head_words));
  gather_kv_kernel<Word><<<grid, block, 0, stream>>>(
      static_cast<const Word*>(a.k_cache), static_cast<const Word*>(a.v_cache), a.block_table,
      static_cast<Word*>(a.out_k), static_cast<Word*>(a.out_v), static_cast<int>(a.num_heads), head_words,
      a.block_size, in_words(a.k_cache_strides, scale), in_words(a.v_cache_strides, scale),
      a.out_token_stride / scale, a.out_head_stride / scale);
  check_cuda(cudaGetLastError(), "gather_kv_kernel<<<>>> (kernel launch)");
}

}  // namespace

void scatter_kv(const ScatterArgs& args, cudaStream_t stream) {
  if (args.num_tokens <= 0 || args.num_layers <= 0) return;  // nothing to copy; an empty grid is a launch error
  check_common(args.elem_size, args.num_tokens, args.num_heads, args.head_dim, args.block_size);
  if (args.num_layers > kMaxGridY) {
    throw std::invalid_argument("kvfast: at most 65535 layers per launch, got " + std::to_string(args.num_layers));
  }
  ScatterArgs a = args;
  for (SrcStrides* s : {&a.src_k_strides, &a.src_v_strides}) {
    *s = {used_stride(a.num_layers, s->layer), used_stride(a.num_tokens, s->token), used_stride(a.num_heads, s->head)};
  }
  for (CacheStrides* s : {&a.k_cache_strides, &a.v_cache_strides}) {
    *s = {used_stride(a.num_layers, s->layer), s->block, used_stride(a.block_size, s->page),
          used_stride(a.num_heads, s->head)};
  }
  const int64_t word_bytes = copy_word_bytes(
      a.elem_size, a.head_dim, {a.src_k, a.src_v, a.k_cache, a.v_cache},
      {a.src_k_strides.layer, a.src_k_strides.token, a.src_k_strides.head,
       a.src_v_strides.layer, a.src_v_strides.token, a.src_v_strides.head,
       a.k_cache_strides.layer, a.k_cache_strides.block, a.k_cache_strides.page, a.k_cache_strides.head,
       a.v_cache_strides.layer, a.v_cache_strides.block, a.v_cache_strides.page, a.v_cache_strides.head});
  switch (word_bytes) {
    case 16: return launch_scatter<uint4>(a, word_bytes, stream);  // one 128-bit access per thread
    case 8: return launch_scatter<uint2>(a, word_bytes, stream);
    case 4: return launch_scatter<uint32_t>(a, word_bytes, stream);
    case 2: return launch_scatter<uint16_t>(a, word_bytes, stream);
    default: return launch_scatter<uint8_t>(a, word_bytes, stream);
  }
}

void gather_kv(const GatherArgs& args, cudaStream_t stream) {
  if (args.num_tokens <= 0) return;
  check_common(args.elem_size, args.num_tokens, args.num_heads, args.head_dim, args.block_size);
  GatherArgs a = args;
  for (PageStrides* s : {&a.k_cache_strides, &a.v_cache_strides}) {
    *s = {s->block, used_stride(a.block_size, s->page), used_stride(a.num_heads, s->head)};
  }
  a.out_token_stride = used_stride(a.num_tokens, a.out_token_stride);
  a.out_head_stride = used_stride(a.num_heads, a.out_head_stride);
  const int64_t word_bytes = copy_word_bytes(
      a.elem_size, a.head_dim, {a.k_cache, a.v_cache, a.out_k, a.out_v},
      {a.k_cache_strides.block, a.k_cache_strides.page, a.k_cache_strides.head, a.v_cache_strides.block,
       a.v_cache_strides.page, a.v_cache_strides.head, a.out_token_stride, a.out_head_stride});
  switch (word_bytes) {
    case 16: return launch_gather<uint4>(a, word_bytes, stream);
    case 8: return launch_gather<uint2>(a, word_bytes, stream);
    case 4: return launch_gather<uint32_t>(a, word_bytes, stream);
    case 2: return launch_gather<uint16_t>(a, word_bytes, stream);
    default: return launch_gather<uint8_t>(a, word_bytes, stream);
  }
}

}  // namespace cuda
}  // namespace kvfast
