// What the GPU sink enqueues for one chunk, computed apart from enqueuing it: the scatter kernel's arguments, or
// the DMA copies' addresses and lengths. Free of CUDA, so the host emulation (kvfast._C_cuda_host) runs the same
// functions on the CPU and tests/test_cuda_host.py compares what they write with the reference loader, for every
// layout, block size and prefix.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "paged_kv_kernels.h"
#include "paged_loader.h"

namespace kvfast {
namespace cuda {

// geometry: (num_blocks, block_size, num_heads, head_bytes, block_stride, token_stride, head_stride), strides in
// bytes. Fills *layout and returns "" when the geometry is usable with elements of elem_size bytes, else says why.
std::string parse_device_layout(const std::array<int64_t, 7>& geometry, int64_t elem_size, PagedLayout* layout);

// The slot of each token of the load: block_table[t / block_size] * block_size + t % block_size, t < num_tokens.
std::vector<int64_t> token_slots(const std::vector<int64_t>& block_table, int64_t num_tokens, int64_t block_size);

// Scatter: the kernel arguments that write chunk c, whose stored bytes (K rows then V rows, docs/FORMAT.md §6)
// are at `staging`, into dest's pages; `slots` is token_slots() of the load (indexed from token 0). Tokens at or
// past num_tokens (a prefix load's last chunk) are not written.
ScatterArgs chunk_scatter_args(const PagedLayout& layout, const ChunkSpec& c, int64_t num_tokens, int64_t elem_size,
                               const uint8_t* staging, const LayerDest& dest, const int64_t* slots);

// DMA: one copy per run of tokens inside one block, K's runs then V's. Pages must hold a block's token rows
// contiguously (NHD: layout.rows_contiguous()).
struct CopyRuns {
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<size_t> sizes;
};
void chunk_dma_runs(const PagedLayout& layout, const ChunkSpec& c, int64_t num_tokens, const uint8_t* staging,
                    const LayerDest& dest, const std::vector<int64_t>& block_table, CopyRuns* runs);

}  // namespace cuda
}  // namespace kvfast
