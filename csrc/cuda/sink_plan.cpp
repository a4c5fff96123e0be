// The GPU sink's per-chunk arithmetic (sink_plan.h).
#include "sink_plan.h"

#include <algorithm>

namespace kvfast {
namespace cuda {

std::string parse_device_layout(const std::array<int64_t, 7>& geometry, int64_t elem_size, PagedLayout* layout) {
  for (int64_t g : geometry)
    if (g < 0) return "layout holds a negative size or stride";
  *layout = {geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6]};
  if (layout->num_blocks < 1 || layout->block_size < 1 || layout->num_heads < 1 || layout->head_bytes < 1 ||
      layout->head_bytes % elem_size != 0)
    return "layout must have num_blocks, block_size, num_heads >= 1 and head_bytes a multiple of elem_size";
  if (layout->block_stride % elem_size || layout->token_stride % elem_size || layout->head_stride % elem_size)
    return "layout strides must be multiples of elem_size";
  return "";
}

std::vector<int64_t> token_slots(const std::vector<int64_t>& block_table, int64_t num_tokens, int64_t block_size) {
  std::vector<int64_t> slots(static_cast<size_t>(num_tokens));
  for (int64_t t = 0; t < num_tokens; ++t)
    slots[static_cast<size_t>(t)] = block_table[static_cast<size_t>(t / block_size)] * block_size + t % block_size;
  return slots;
}

ScatterArgs chunk_scatter_args(const PagedLayout& layout, const ChunkSpec& c, int64_t num_tokens, int64_t elem_size,
                               const uint8_t* staging, const LayerDest& dest, const int64_t* slots) {
  const int64_t tokens = c.stop - c.start;                        // rows stored per half (K, V)
  const int64_t stored = std::min(c.stop, num_tokens) - c.start;  // rows written: fewer in a prefix's last chunk
  const int64_t head_dim = layout.head_bytes / elem_size;
  ScatterArgs a{};
  a.src_k = staging;
  a.src_v = staging + tokens * layout.row_bytes();
  a.k_cache = dest.pages[0];
  a.v_cache = dest.pages[1];
  a.slot_mapping = slots + c.start;
  a.num_layers = 1;
  a.num_tokens = stored;
  a.num_heads = layout.num_heads;
  a.head_dim = head_dim;
  a.block_size = layout.block_size;
  a.elem_size = elem_size;
  a.src_k_strides = {0, layout.num_heads * head_dim, head_dim};  // the chunk's rows: [tokens, H, D], contiguous
  a.src_v_strides = a.src_k_strides;
  a.k_cache_strides = {0, layout.block_stride / elem_size, layout.token_stride / elem_size,
                       layout.head_stride / elem_size};
  a.v_cache_strides = a.k_cache_strides;
  return a;
}

void chunk_dma_runs(const PagedLayout& layout, const ChunkSpec& c, int64_t num_tokens, const uint8_t* staging,
                    const LayerDest& dest, const std::vector<int64_t>& block_table, CopyRuns* runs) {
  const int64_t bs = layout.block_size;
  const int64_t row = layout.row_bytes();
  const int64_t tokens = c.stop - c.start;
  const int64_t end = std::min(c.stop, num_tokens);
  runs->dsts.clear();
  runs->srcs.clear();
  runs->sizes.clear();
  for (int kv = 0; kv < 2; ++kv) {
    const uint8_t* src = staging + kv * tokens * row;
    for (int64_t t = c.start; t < end;) {
      const int64_t run = std::min(bs - t % bs, end - t);
      runs->dsts.push_back(dest.pages[kv] + block_table[static_cast<size_t>(t / bs)] * layout.block_stride +
                           (t % bs) * layout.token_stride);
      runs->srcs.push_back(src + (t - c.start) * row);
      runs->sizes.push_back(static_cast<size_t>(run * row));
      t += run;
    }
  }
}

}  // namespace cuda
}  // namespace kvfast
