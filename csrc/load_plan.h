// The load plan at the Python boundary: the chunk rows kvfast.format validated and the sequence's block table,
// checked again here because they index raw memory, before any job sees them. Shared by kvfast._C (host pages)
// and kvfast._C_cuda (device pages), so both refuse exactly the same inputs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "paged_loader.h"

namespace kvfast {

// The scalar arguments every load takes. "" or what is wrong.
std::string check_load_args(int fd, int64_t num_tokens, int threads, uint64_t piece_bytes);

// rows: [n, 7] int64, row-major: index, layer, start, stop, offset, length, crc32c (codec "raw": length is
// 2 * tokens * row_bytes). Fills *plan and returns "" when every row is consistent, else says which row is not.
std::string parse_plan(const int64_t* rows, int64_t n, int64_t num_layers, int64_t num_tokens, int64_t row_bytes,
                       std::vector<ChunkSpec>* plan);

// Every entry a block id of the layout, and enough of them for num_tokens. "" or what is wrong.
std::string check_block_table(const std::vector<int64_t>& table, int64_t num_tokens, const PagedLayout& layout);

}  // namespace kvfast
