// expcode: the lossless exponent codec of docs/FORMAT.md §7.1-7.2 (reference: kvfast/codec/expcode.py).
//
// One chunk = K then V, each [tokens, heads, head_dim] floats of `itemsize` bytes. Each float is rotated left
// by one bit; its top byte (the exponent) is Huffman-coded per (K/V, head) plane, the other bytes are stored
// raw. Planes are cut into segments of seg_tokens tokens, each an independent bit stream, so segments decode
// in parallel and each writes to an address known in advance. With `repeats` (expcode-v2), a token's K (or V)
// row equal to an earlier one of the chunk is stored as a (row, source) pair instead of being coded.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kvfast::expcode {

struct ChunkShape {
  int64_t tokens = 0;    // t >= 1
  int64_t heads = 0;     // H >= 1
  int64_t head_dim = 0;  // Dh >= 1
  int itemsize = 0;      // 2 (bf16, fp16) or 4 (fp32)

  int64_t elements() const { return tokens * heads * head_dim; }  // of K (or V)
};

// Encodes one chunk. k, v: [tokens, heads, head_dim] words of `itemsize` bytes (the floats' bits), C-contiguous.
// seg_tokens in [1, tokens]. repeats: expcode-v2 (true) or v1. Uses up to `threads` threads (one plane each).
std::vector<uint8_t> encode(const uint8_t* k, const uint8_t* v, const ChunkShape& shape, int64_t seg_tokens,
                            bool repeats, int threads);

// Decodes `len` encoded bytes into out: [2 * elements * itemsize] bytes, K then V. Every size, table and stream
// is checked before it is used; reads stay inside [src, src + len). Returns "" or what is wrong, naming the field.
std::string decode(const uint8_t* src, size_t len, uint8_t* out, const ChunkShape& shape, bool repeats,
                   int threads);

}  // namespace kvfast::expcode
