// kvfast CUDA paged-cache kernels: scatter tokens into pages (many layers per launch), gather a sequence back.
//
// Plain copies driven by strides. The bodies and the choice of copy word (the widest that every address allows,
// so a bf16 row of 128 is 16 uint4 loads and stores) are in paged_kv_kernels.h, shared with the host emulation;
// this file only wraps them in __global__ kernels and launches them.
#include "paged_kv.h"

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace kvfast {
namespace cuda {
namespace {

template <typename Word>
__global__ void scatter_kv_kernel(const Word* __restrict__ src_k, const Word* __restrict__ src_v,
                                  Word* __restrict__ k_cache, Word* __restrict__ v_cache, ScatterGeometry g) {
  scatter_kv_cta(src_k, src_v, k_cache, v_cache, g, blockIdx.x, blockIdx.y, threadIdx.x, blockDim.x);
}

template <typename Word>
__global__ void gather_kv_kernel(const Word* __restrict__ k_cache, const Word* __restrict__ v_cache,
                                 Word* __restrict__ out_k, Word* __restrict__ out_v, GatherGeometry g) {
  gather_kv_cta(k_cache, v_cache, out_k, out_v, g, blockIdx.x, threadIdx.x, blockDim.x);
}

}  // namespace

int64_t scatter_kv(const ScatterArgs& args, int device, cudaStream_t stream) {
  ScatterArgs a = args;
  LaunchPlan plan;
  if (!plan_scatter(&a, &plan)) return 0;
  DeviceGuard guard(device);
  guard.check();
  dispatch_word(plan.word_bytes, [&](auto word) {
    using Word = decltype(word);
    const dim3 grid(static_cast<unsigned>(a.num_tokens), static_cast<unsigned>(a.num_layers));
    clear_last_error();
    scatter_kv_kernel<Word><<<grid, plan.threads, 0, stream>>>(
        static_cast<const Word*>(a.src_k), static_cast<const Word*>(a.src_v), static_cast<Word*>(a.k_cache),
        static_cast<Word*>(a.v_cache), scatter_geometry(a, plan));
    check_cuda(cudaGetLastError(), "scatter_kv_kernel<<<>>> (kernel launch)");
  });
  return plan.word_bytes;
}

int64_t gather_kv(const GatherArgs& args, int device, cudaStream_t stream) {
  GatherArgs a = args;
  LaunchPlan plan;
  if (!plan_gather(&a, &plan)) return 0;
  DeviceGuard guard(device);
  guard.check();
  dispatch_word(plan.word_bytes, [&](auto word) {
    using Word = decltype(word);
    clear_last_error();
    gather_kv_kernel<Word><<<static_cast<unsigned>(a.num_tokens), plan.threads, 0, stream>>>(
        static_cast<const Word*>(a.k_cache), static_cast<const Word*>(a.v_cache), static_cast<Word*>(a.out_k),
        static_cast<Word*>(a.out_v), gather_geometry(a, plan));
    check_cuda(cudaGetLastError(), "gather_kv_kernel<<<>>> (kernel launch)");
  });
  return plan.word_bytes;
}

}  // namespace cuda
}  // namespace kvfast
