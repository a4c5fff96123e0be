// kvfast CUDA paged-cache kernels: the host-side API.
//
// Launchers take raw device pointers, strides, the device and a stream, so the Python wrappers
// (kvfast/kernels/cuda.py, through kvfast._C_cuda) and a C++ load pipeline call the same code. They launch on
// `device` (made current for the launch, then restored: `stream` 0 is that device's legacy default stream), are
// asynchronous on `stream`, do not synchronize, return the copy word they chose in bytes (0: nothing to copy,
// and no CUDA call made), and throw std::runtime_error naming the failing CUDA call (std::invalid_argument for
// bad sizes).
//
// The argument structs, the launch planning and the kernels' bodies are in paged_kv_kernels.h, free of CUDA, so
// that the host emulation (host_emulation.cpp) runs the very same code on the CPU.
#pragma once

#include <cuda_runtime_api.h>

#include "paged_kv_kernels.h"

namespace kvfast {
namespace cuda {

// Writes every layer's token i to slot slot_mapping[i] (vLLM's reshape_and_cache_flash, for many layers at
// once). One launch; the grid is (num_tokens, num_layers).
int64_t scatter_kv(const ScatterArgs& args, int device, cudaStream_t stream);

// Copies tokens [0, num_tokens) of a sequence out of its pages, in order. One launch; the grid is num_tokens.
int64_t gather_kv(const GatherArgs& args, int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace kvfast
