#include "load_plan.h"

namespace kvfast {

std::string check_load_args(int fd, int64_t num_tokens, int threads, uint64_t piece_bytes) {
  if (threads < 1 || threads > 256) return "threads must be in [1, 256]";
  if (piece_bytes < 4096 || piece_bytes > (1u << 30)) return "piece_bytes must be in [4096, 2**30]";
  if (fd < 0) return "fd must be an open file descriptor";
  if (num_tokens < 1) return "num_tokens must be >= 1";
  return "";
}

std::string parse_plan(const int64_t* rows, int64_t n, int64_t num_layers, int64_t num_tokens, int64_t row_bytes,
                       std::vector<ChunkSpec>* plan) {
  if (n < 1) return "chunks must be [n >= 1, 7]: index, layer, start, stop, offset, length, crc32c";
  plan->clear();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* r = rows + 7 * i;
    const int64_t layer = r[1], start = r[2], stop = r[3], offset = r[4], length = r[5], crc = r[6];
    const std::string where = "chunks[" + std::to_string(i) + "]";
    if (layer < 0 || layer >= num_layers) return where + ": layer out of range";
    if (start < 0 || stop <= start || start >= num_tokens) return where + ": bad token range";
    int64_t want = 0, end = 0;
    if (__builtin_mul_overflow(stop - start, row_bytes, &want) || __builtin_mul_overflow(want, int64_t{2}, &want) ||
        want != length)
      return where + ": length is not 2 * tokens * num_heads * head_bytes";
    if (offset < 0 || __builtin_add_overflow(offset, length, &end)) return where + ": bad offset";
    if (crc < 0 || crc > 0xFFFFFFFFll) return where + ": crc32c out of range";
    if (i > 0 && layer < plan->back().layer) return "chunks must be in file order (layer-major)";
    plan->push_back({r[0], layer, start, stop, static_cast<uint64_t>(offset), static_cast<uint64_t>(length),
                     static_cast<uint32_t>(crc)});
  }
  return "";
}

std::string check_block_table(const std::vector<int64_t>& table, int64_t num_tokens, const PagedLayout& layout) {
  if (static_cast<int64_t>(table.size()) < (num_tokens + layout.block_size - 1) / layout.block_size)
    return "block_table is too short for num_tokens";
  for (int64_t b : table)
    if (b < 0 || b >= layout.num_blocks) return "block_table holds a block id outside [0, num_blocks)";
  return "";
}

}  // namespace kvfast
