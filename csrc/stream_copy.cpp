// Streaming (non-temporal) copies; see stream_copy.h.
#include "stream_copy.h"

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KVFAST_X86 1
#endif

namespace kvfast {

#ifdef KVFAST_X86
namespace {

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

__attribute__((target("avx512f"))) void stream_copy_avx512(uint8_t* dst, const uint8_t* src, size_t n) {
  size_t i = 0;
  for (; i + 256 <= n; i += 256) {  // four lines per step: loads run ahead of the stores
    const __m512i a = _mm512_loadu_si512(src + i);
    const __m512i b = _mm512_loadu_si512(src + i + 64);
    const __m512i c = _mm512_loadu_si512(src + i + 128);
    const __m512i d = _mm512_loadu_si512(src + i + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 192), d);
  }
  for (; i + 64 <= n; i += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(src + i));
  std::memcpy(dst + i, src + i, n - i);
}

}  // namespace
#endif

void stream_copy(void* dst, const void* src, size_t n) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* s = static_cast<const uint8_t*>(src);
#ifdef KVFAST_X86
  if (has_avx512() && reinterpret_cast<uintptr_t>(d) % 64 == 0 && n >= 64) {
    stream_copy_avx512(d, s, n);
    return;
  }
#endif
  std::memcpy(d, s, n);
}

void stream_fence() {
#ifdef KVFAST_X86
  _mm_sfence();
#endif
}

}  // namespace kvfast
