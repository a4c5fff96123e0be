// CRC-32C (Castagnoli), the checksum of every .kvf chunk (docs/FORMAT.md, section "Checksums").
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvfast {

// Continues a CRC-32C: crc32c(data, n, crc32c(prefix, m)) == crc32c(prefix || data, m + n).
// Start with 0. Same convention as the `crc32c` Python package and RFC 3720.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);

// "sse4.2" when the hardware instruction is used, "software" otherwise.
const char* crc32c_impl();

}  // namespace kvfast
