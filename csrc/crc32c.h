// CRC-32C (Castagnoli), the checksum of every .kvf chunk (docs/FORMAT.md, section "Checksums").
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvfast {

// Continues a CRC-32C: crc32c(data, n, crc32c(prefix, m)) == crc32c(prefix || data, m + n).
// Start with 0. Same convention as the `crc32c` Python package and RFC 3720.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// Copies n bytes src -> dst and returns the CRC-32C of the bytes written, continuing from crc, reading src
// once: the checksum is of exactly the values stored. stream: non-temporal stores where the CPU and dst's
// alignment allow (see stream_copy.h; call stream_fence() after the batch).
uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc, bool stream);

// "avx512-vpclmulqdq", "sse4.2" or "software": the implementation crc32c() runs on this CPU.
const char* crc32c_impl();

}  // namespace kvfast
