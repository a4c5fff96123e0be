// CRC-32C with the SSE4.2 instruction where the CPU has it, three independent lanes at a time so the
// instruction's 3-cycle latency is hidden (the lanes are joined with a precomputed "shift by L zero bytes"
// operator, since CRC is linear over GF(2)); a slicing-by-8 table otherwise.
#include "crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
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
#endif

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const uint8_t*>(data);
#ifdef KVFAST_X86
  if (has_sse42()) return ~update_hw(~crc, p, n);
#endif
  return ~update_soft(~crc, p, n);
}

const char* crc32c_impl() {
#ifdef KVFAST_X86
  if (has_sse42()) return "sse4.2";
#endif
  return "software";
}

}  // namespace kvfast
