// CRC-32C, fastest first:
//   avx512-vpclmulqdq  carry-less multiplication folds 256 bytes per step into four 512-bit accumulators
//                      (~3x the crc32 instruction on data already in cache: the loader checksums every byte);
//   sse4.2             the crc32 instruction, three independent lanes at a time so its 3-cycle latency is
//                      hidden (the lanes are joined with a precomputed "shift by L zero bytes" operator, since
//                      CRC is linear over GF(2));
//   software           a slicing-by-8 table.
#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <nmmintrin.h>
#define KVFAST_X86 1
#endif

namespace kvfast {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

// Tables for slicing-by-8: table[k][b] = register after feeding byte b followed by k zero bytes.
struct SoftTables {
  uint32_t t[8][256];
  SoftTables() {
    for (uint32_t b = 0; b < 256; ++b) {
      uint32_t c = b;
      for (int i = 0; i < 8; ++i) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; ++b)
      for (int k = 1; k < 8; ++k) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFF];
  }
};
const SoftTables& soft_tables() {
  static const SoftTables tables;
  return tables;
}

// Raw register update (no pre/post inversion), so lanes can be combined linearly.
uint32_t update_soft(uint32_t reg, const uint8_t* p, size_t n) {
  const auto& t = soft_tables().t;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= reg;
    reg = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
          t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) reg = (reg >> 8) ^ t[0][(reg ^ *p++) & 0xFF];
  return reg;
}

#ifdef KVFAST_X86
constexpr size_t kLane = 8192;  // bytes per lane; 3 lanes per stripe

__attribute__((target("sse4.2"))) uint32_t update_hw_1(uint32_t reg, const uint8_t* p, size_t n) {
  uint64_t r = reg;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    r = _mm_crc32_u64(r, w);
    p += 8;
    n -= 8;
  }
  uint32_t r32 = static_cast<uint32_t>(r);
  while (n--) r32 = _mm_crc32_u8(r32, *p++);
  return r32;
}

// shift[k][b]: the register after feeding kLane zero bytes to a register holding byte b at position k.
struct ShiftTables {
  uint32_t t[4][256];
  ShiftTables() {
    static uint8_t zeros[kLane];
    uint32_t basis[32];
    for (int i = 0; i < 32; ++i) basis[i] = update_soft(1u << i, zeros, kLane);
    for (int k = 0; k < 4; ++k)
      for (uint32_t b = 0; b < 256; ++b) {
        uint32_t v = 0;
        for (int i = 0; i < 8; ++i)
          if (b & (1u << i)) v ^= basis[8 * k + i];
        t[k][b] = v;
      }
  }
  uint32_t shift(uint32_t reg) const {
    return t[0][reg & 0xFF] ^ t[1][(reg >> 8) & 0xFF] ^ t[2][(reg >> 16) & 0xFF] ^ t[3][reg >> 24];
  }
};
const ShiftTables& shift_tables() {
  static const ShiftTables tables;
  return tables;
}

__attribute__((target("sse4.2"))) uint32_t update_hw(uint32_t reg, const uint8_t* p, size_t n) {
  const ShiftTables& sh = shift_tables();
  while (n >= 3 * kLane) {
    uint64_t a = reg, b = 0, c = 0;
    const uint8_t* pa = p;
    const uint8_t* pb = p + kLane;
    const uint8_t* pc = p + 2 * kLane;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t wa, wb, wc;
      std::memcpy(&wa, pa + i, 8);
      std::memcpy(&wb, pb + i, 8);
      std::memcpy(&wc, pc + i, 8);
      a = _mm_crc32_u64(a, wa);
      b = _mm_crc32_u64(b, wb);
      c = _mm_crc32_u64(c, wc);
    }
    reg = sh.shift(sh.shift(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^ static_cast<uint32_t>(c);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return update_hw_1(reg, p, n);
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}

// -- folding with VPCLMULQDQ ------------------------------------------------------------------------------
// Bytes are read little-endian, so in a 128-bit lane the polynomial degree d (d = 127 for the first bit on the
// wire) sits at bit 127 - d: the low qword H holds the high-degree half, the high qword L the low one. A lane
// A = H x^64 + L that is followed D bits later by lane B contributes A x^D to B's position, and
// A x^D = H x^(64+D) + L x^D == H k_lo + L k_hi (mod P): two 64x32-bit carry-less products of degree < 96,
// which XOR straight into B. In this bit order a product comes out multiplied by x once more, hence the
// constants are x^(64+D-1) and x^(D-1) mod P. The loop keeps 4 zmm accumulators (D = 4 * 512 bits); at the
// end the 256 bytes they hold are worth the same as all the data folded into them, and the crc32 instruction
// reduces them.
constexpr size_t kFoldBytes = 256;  // 4 zmm accumulators

// x^n mod P in the reflected 64-bit operand form the loop multiplies by (degree e at bit 63 - e).
uint64_t xpow_mod(unsigned n) {
  uint64_t r = 1;  // normal bit order while computing: degree e at bit e
  for (unsigned i = 0; i < n; ++i) {
    r <<= 1;
    if (r & (1ull << 32)) r ^= (1ull << 32) | 0x1EDC6F41ull;  // P in normal bit order
  }
  uint64_t refl = 0;
  for (int e = 0; e < 32; ++e)
    if (r & (1ull << e)) refl |= 1ull << (63 - e);
  return refl;
}

#define KVFAST_CLMUL_TARGET __attribute__((target("avx512f,avx512vl,vpclmulqdq,sse4.2")))

// One 64-byte load of the stream being folded; with kCopy also stored to dst (kStream: non-temporal).
template <bool kCopy, bool kStream>
KVFAST_CLMUL_TARGET inline __m512i load64(const uint8_t* src, uint8_t* dst) {
  const __m512i v = _mm512_loadu_si512(src);
  if (kCopy) {
    if (kStream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), v);
    } else {
      _mm512_storeu_si512(dst, v);
    }
  }
  return v;
}

// Folds p[0..n) (n >= 2 * kFoldBytes, a multiple of kFoldBytes) into the register; with kCopy, each 64 bytes
// are also stored to dst as they are loaded, so the CRC is of exactly the values written.
template <bool kCopy, bool kStream>
KVFAST_CLMUL_TARGET uint32_t fold_clmul(uint32_t reg, const uint8_t* p, size_t n, uint8_t* dst) {
  static const uint64_t k_lo = xpow_mod(64 + 8 * kFoldBytes - 1);
  static const uint64_t k_hi = xpow_mod(8 * kFoldBytes - 1);
  const __m512i k = _mm512_set_epi64(k_hi, k_lo, k_hi, k_lo, k_hi, k_lo, k_hi, k_lo);
  __m512i a0 = load64<kCopy, kStream>(p, dst);
  __m512i a1 = load64<kCopy, kStream>(p + 64, dst + 64);
  __m512i a2 = load64<kCopy, kStream>(p + 128, dst + 128);
  __m512i a3 = load64<kCopy, kStream>(p + 192, dst + 192);
  a0 = _mm512_xor_si512(a0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(reg))));
  for (size_t i = kFoldBytes; i < n; i += kFoldBytes) {
    // acc * x^D (two carry-less products) xor the next 64 bytes, in one ternary-logic op (0x96 = a ^ b ^ c)
#define KVFAST_FOLD(acc, off)                                                                                  \
  acc = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(acc, k, 0x00), _mm512_clmulepi64_epi128(acc, k, 0x11), \
                                  load64<kCopy, kStream>(p + i + (off), dst + i + (off)), 0x96)
    KVFAST_FOLD(a0, 0);
    KVFAST_FOLD(a1, 64);
    KVFAST_FOLD(a2, 128);
    KVFAST_FOLD(a3, 192);
#undef KVFAST_FOLD
  }
  alignas(64) uint8_t rest[kFoldBytes];
  _mm512_store_si512(rest, a0);
  _mm512_store_si512(rest + 64, a1);
  _mm512_store_si512(rest + 128, a2);
  _mm512_store_si512(rest + 192, a3);
  return update_hw_1(0, rest, kFoldBytes);
}

KVFAST_CLMUL_TARGET uint32_t update_clmul(uint32_t reg, const uint8_t* p, size_t n) {
  if (n < 2 * kFoldBytes) return update_hw(reg, p, n);
  const size_t body = n / kFoldBytes * kFoldBytes;
  reg = fold_clmul<false, false>(reg, p, body, nullptr);
  return update_hw(reg, p + body, n - body);
}

KVFAST_CLMUL_TARGET uint32_t copy_clmul(uint32_t reg, uint8_t* dst, const uint8_t* src, size_t n, bool stream) {
  if (n < 2 * kFoldBytes) {
    std::memcpy(dst, src, n);
    return update_hw(reg, dst, n);
  }
  const size_t body = n / kFoldBytes * kFoldBytes;
  if (stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    reg = fold_clmul<true, true>(reg, src, body, dst);  // the caller fences (stream_fence) after its last copy
  } else {
    reg = fold_clmul<true, false>(reg, src, body, dst);
  }
  std::memcpy(dst + body, src + body, n - body);
  return update_hw(reg, dst + body, n - body);  // the tail from the copy: what was checked is what was written
}

bool has_clmul() {
  static const bool yes = __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
#ifdef KVFAST_X86
  if (has_clmul()) return ~update_clmul(~crc, p, n);
  if (has_sse42()) return ~update_hw(~crc, p, n);
#endif
  return ~update_soft(~crc, p, n);
}

uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc, bool stream) {
  auto* d = static_cast<uint8_t*>(dst);
  const auto* p = static_cast<const uint8_t*>(src);
#ifdef KVFAST_X86
  if (has_clmul()) return ~copy_clmul(~crc, d, p, n, stream);
#endif
  std::memcpy(d, p, n);
  return crc32c(d, n, crc);
}

const char* crc32c_impl() {
#ifdef KVFAST_X86
  if (has_clmul()) return "avx512-vpclmulqdq";
  if (has_sse42()) return "sse4.2";
#endif
  return "software";
}

}  // namespace kvfast
