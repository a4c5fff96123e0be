// Copies that bypass the cache (non-temporal stores): for bytes written into the paged cache, which nobody
// reads again soon. They skip the read-for-ownership of each destination line, so a copy costs one read and
// one write of memory instead of two reads and one write.
#pragma once
#include <cstddef>

namespace kvfast {

// dst[0..n) = src[0..n), with non-temporal stores where the CPU (AVX-512) and dst's 64-byte alignment allow,
// plain memcpy otherwise.
void stream_copy(void* dst, const void* src, size_t n);

// Non-temporal stores are weakly ordered: call this after a batch of streaming copies (stream_copy, or
// crc32c_copy with stream=true), before telling another thread the bytes are there. One fence per batch: a
// fence per 32 KiB copy measured ~7% slower.
void stream_fence();

}  // namespace kvfast
