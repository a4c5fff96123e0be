// expcode-v1 encoder and decoder (docs/FORMAT.md §7.1); kvfast/codec/expcode.py is the reference they match.
#include "expcode.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

namespace kvfast::expcode {
namespace {

constexpr int kMaxCodeBits = 12;  // longest code: one 4096-entry table lookup decodes it
constexpr int kHeaderBytes = 4;     // u32 seg_tokens
constexpr int kTableHeadBytes = 2;  // a code table: u8 first symbol, u8 last symbol, then 4-bit lengths

// Bytes of the code table starting with first, last.
uint64_t table_size(uint8_t first, uint8_t last) { return kTableHeadBytes + (last - first + 2) / 2; }

// ==========================================================================================================
// The chunk layout: header, 2H code tables, raw bytes, segment directory, bit streams
// ==========================================================================================================
struct Layout {
  int64_t seg_tokens = 0;
  int64_t segs_per_plane = 0;
  std::vector<uint64_t> tables;              // [2H + 1] byte offsets: each plane's code table, then its end
  uint64_t raw = 0, directory = 0, streams = 0;  // byte offsets
};

// The layout of a chunk whose raw bytes start at `raw` (after the code tables).
Layout layout_for(const ChunkShape& s, int64_t seg_tokens, uint64_t raw) {
  Layout l;
  l.seg_tokens = seg_tokens;
  l.segs_per_plane = (s.tokens + seg_tokens - 1) / seg_tokens;
  const uint64_t planes = 2 * static_cast<uint64_t>(s.heads);
  l.raw = raw;
  l.directory = l.raw + 2 * static_cast<uint64_t>(s.elements()) * (s.itemsize - 1);
  l.streams = l.directory + 4 * planes * static_cast<uint64_t>(l.segs_per_plane);
  return l;
}

uint32_t load_le32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;  // little-endian hosts only (kvfast/format.py refuses others)
}

void store_le32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

// Run fn(i) for i in [0, n) on up to `threads` threads (the calling one included), each taking the next i.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  std::atomic<int64_t> next{0};
  auto work = [&] {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// ==========================================================================================================
// The bit split: rotate left by one, top byte = symbol, the rest = raw bytes (little-endian)
// ==========================================================================================================
template <int S>
struct Word;
template <>
struct Word<2> {
  using T = uint16_t;
};
template <>
struct Word<4> {
  using T = uint32_t;
};

template <int S>
typename Word<S>::T load_word(const uint8_t* p) {
  typename Word<S>::T w;
  std::memcpy(&w, p, S);
  return w;
}

// ==========================================================================================================
// Canonical Huffman codes, limited to 12 bits: the same algorithm as expcode.py's code_lengths
// ==========================================================================================================
void code_lengths(const uint64_t freq_in[256], uint8_t lengths[256]) {
  uint64_t freq[256];
  std::memcpy(freq, freq_in, sizeof(freq));
  std::memset(lengths, 0, 256);
  std::vector<int> present;
  for (int s = 0; s < 256; ++s)
    if (freq[s]) present.push_back(s);
  if (present.size() == 1) {
    lengths[present[0]] = 1;
    return;
  }
  const size_t m = present.size();
  std::vector<std::pair<uint64_t, int>> leaves(m);
  std::vector<uint64_t> weight;
  std::vector<size_t> parent(2 * m - 1), depth(2 * m - 1);
  for (;;) {
    for (size_t i = 0; i < m; ++i) leaves[i] = {freq[present[i]], present[i]};
    std::sort(leaves.begin(), leaves.end());
    weight.assign(m, 0);
    for (size_t i = 0; i < m; ++i) weight[i] = leaves[i].first;
    size_t li = 0, ni = m;
    auto take = [&]() -> size_t {
      if (li < m && (ni == weight.size() || weight[li] <= weight[ni])) return li++;
      return ni++;
    };
    while (weight.size() < 2 * m - 1) {
      const size_t a = take(), b = take();
      parent[a] = parent[b] = weight.size();
      weight.push_back(weight[a] + weight[b]);
    }
    depth[2 * m - 2] = 0;
    size_t longest = 0;
    for (size_t node = 2 * m - 2; node-- > 0;) {
      depth[node] = depth[parent[node]] + 1;
      if (node < m) longest = std::max(longest, depth[node]);
    }
    if (longest <= kMaxCodeBits) {
      for (size_t i = 0; i < m; ++i) lengths[leaves[i].second] = static_cast<uint8_t>(depth[i]);
      return;
    }
    for (int s : present) freq[s] = (freq[s] + 1) / 2;
  }
}

void canonical_codes(const uint8_t lengths[256], uint32_t codes[256]) {
  uint32_t count[kMaxCodeBits + 1] = {0}, next[kMaxCodeBits + 2] = {0};
  for (int s = 0; s < 256; ++s)
    if (lengths[s]) ++count[lengths[s]];
  uint32_t code = 0;
  for (int n = 1; n <= kMaxCodeBits; ++n) {
    code = (code + count[n - 1]) << 1;
    next[n] = code;
  }
  for (int s = 0; s < 256; ++s) codes[s] = lengths[s] ? next[lengths[s]]++ : 0;
}

// ==========================================================================================================
// Encoder
// ==========================================================================================================
// Codes appended MSB first; the last byte padded with zero bits.
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>* out) : out_(out) {}
  void put(uint32_t code, int bits) {
    acc_ = (acc_ << bits) | code;
    n_ += bits;
    if (n_ >= 32) {
      n_ -= 32;
      const uint32_t word = static_cast<uint32_t>(acc_ >> n_);
      const uint8_t be[4] = {uint8_t(word >> 24), uint8_t(word >> 16), uint8_t(word >> 8), uint8_t(word)};
      out_->insert(out_->end(), be, be + 4);
    }
  }
  void finish() {
    while (n_ >= 8) {
      n_ -= 8;
      out_->push_back(static_cast<uint8_t>(acc_ >> n_));
    }
    if (n_) out_->push_back(static_cast<uint8_t>(acc_ << (8 - n_)));
    n_ = 0;
  }

 private:
  std::vector<uint8_t>* out_;
  uint64_t acc_ = 0;
  int n_ = 0;
};

template <int S>
void encode_plane(const uint8_t* k, const uint8_t* v, const ChunkShape& shape, const Layout& lay, int64_t plane,
                  uint8_t* raw_plane, std::vector<uint8_t>* table, std::vector<std::vector<uint8_t>>* streams) {
  using T = typename Word<S>::T;
  constexpr int kBits = 8 * S;
  const int64_t head = plane % shape.heads, kv = plane / shape.heads, dh = shape.head_dim;
  const uint8_t* src = kv ? v : k;
  std::vector<uint8_t> symbols(static_cast<size_t>(shape.tokens * dh));
  uint64_t freq[256] = {0};
  for (int64_t tok = 0; tok < shape.tokens; ++tok) {
    const int64_t e0 = (tok * shape.heads + head) * dh;  // element index within K (or V)
    uint8_t* raw = raw_plane + (kv * shape.elements() + e0) * (S - 1);
    for (int64_t d = 0; d < dh; ++d) {
      const T u = load_word<S>(src + (e0 + d) * S);
      const T w = static_cast<T>((u << 1) | (u >> (kBits - 1)));
      const uint8_t sym = static_cast<uint8_t>(w >> (kBits - 8));
      symbols[tok * dh + d] = sym;
      ++freq[sym];
      std::memcpy(raw + d * (S - 1), &w, S - 1);
    }
  }
  uint8_t lengths[256];
  uint32_t codes[256];
  code_lengths(freq, lengths);
  canonical_codes(lengths, codes);
  int first = 0, last = 255;
  while (!lengths[first]) ++first;
  while (!lengths[last]) --last;
  table->assign({static_cast<uint8_t>(first), static_cast<uint8_t>(last)});
  for (int s = first; s <= last; s += 2)
    table->push_back(static_cast<uint8_t>(lengths[s] | (s + 1 <= last ? lengths[s + 1] << 4 : 0)));
  for (int64_t g = 0; g < lay.segs_per_plane; ++g) {
    std::vector<uint8_t>& out = (*streams)[plane * lay.segs_per_plane + g];
    const int64_t first = g * lay.seg_tokens * dh, last = std::min(shape.tokens, (g + 1) * lay.seg_tokens) * dh;
    out.reserve(static_cast<size_t>((last - first) * kMaxCodeBits / 8 + 8));
    BitWriter bits(&out);
    for (int64_t i = first; i < last; ++i) bits.put(codes[symbols[i]], lengths[symbols[i]]);
    bits.finish();
  }
}

// ==========================================================================================================
// Decoder
// ==========================================================================================================
// Decode tables of one plane, for the next 12 bits of a stream (MSB first):
//   single[w] = symbol | length << 8 (length 0: the bits start no code)
//   multi[w]  = sym0 | sym1 << 8 | sym2 << 16 | count << 24 | bits << 26: the codes that fit whole in w
struct Tables {
  uint16_t single[1 << kMaxCodeBits];
  uint32_t multi[1 << kMaxCodeBits];
};

// Below this many symbols in a plane, filling `multi` (4096 entries, ~3 lookups each) costs more than it saves.
constexpr int64_t kMultiMinSymbols = 8192;

// From the code table at `table` (its size checked against the chunk by decode()); `multi` only when asked.
std::string build_tables(const uint8_t* table, Tables* t, bool multi) {
  uint8_t lengths[256] = {0};
  const int first = table[0], last = table[1];
  for (int s = first; s <= last; ++s) {
    const uint8_t byte = table[kTableHeadBytes + (s - first) / 2];
    lengths[s] = (s - first) % 2 ? byte >> 4 : byte & 0x0F;
  }
  uint32_t kraft = 0;
  for (int s = 0; s < 256; ++s) {
    if (lengths[s] > kMaxCodeBits) return "a code length exceeds 12 bits";
    if (lengths[s]) kraft += 1u << (kMaxCodeBits - lengths[s]);
  }
  if (kraft == 0) return "the code table is empty";
  if (kraft > (1u << kMaxCodeBits)) return "code lengths are over-subscribed (Kraft sum > 1)";
  uint32_t codes[256];
  canonical_codes(lengths, codes);
  std::memset(t->single, 0, sizeof(t->single));
  for (int s = 0; s < 256; ++s) {
    if (!lengths[s]) continue;
    const int shift = kMaxCodeBits - lengths[s];
    const uint16_t entry = static_cast<uint16_t>(s | (lengths[s] << 8));
    std::fill(t->single + (codes[s] << shift), t->single + ((codes[s] + 1) << shift), entry);
  }
  if (!multi) return "";
  constexpr uint32_t kMask = (1u << kMaxCodeBits) - 1;
  for (uint32_t w = 0; w <= kMask; ++w) {
    uint32_t entry = 0, used = 0, n = 0;
    while (n < 3) {
      const uint16_t e = t->single[(w << used) & kMask];
      const uint32_t len = e >> 8;
      if (len == 0 || used + len > kMaxCodeBits) break;
      entry |= static_cast<uint32_t>(e & 0xFF) << (8 * n);
      used += len;
      ++n;
    }
    t->multi[w] = entry | n << 24 | used << 26;
  }
  return "";
}

// The 12 bits at bit position `pos` of stream [p, p + n); bytes past the end read as zero.
inline uint32_t peek12(const uint8_t* p, uint64_t n, uint64_t pos) {
  const uint64_t byte = pos >> 3;
  uint64_t w;
  if (byte + 8 <= n) {
    std::memcpy(&w, p + byte, 8);
    w = __builtin_bswap64(w);
  } else {
    w = 0;
    for (uint64_t i = 0; i < 8; ++i) w = (w << 8) | (byte + i < n ? p[byte + i] : 0);
  }
  return static_cast<uint32_t>((w << (pos & 7)) >> (64 - kMaxCodeBits));
}

// One segment's decoding state: stream [p, p + n), `count` symbols into sym (count + 4 bytes of room).
struct Cursor {
  const uint8_t* p = nullptr;
  uint64_t n = 0, pos = 0;  // bytes; bits consumed
  int64_t i = 0, count = 0;
  uint8_t* sym = nullptr;
  bool bad = false;  // the bits at pos start no code

  // Up to three symbols whose codes fit in the next 12 bits, in one lookup (needs count - i >= 3).
  inline void step3(const Tables& t) {
    const uint32_t e = t.multi[peek12(p, n, pos)];
    const uint32_t got = (e >> 24) & 3;
    bad |= got == 0;
    std::memcpy(sym + i, &e, 4);
    i += got + (got == 0) * count;  // a bad code ends the segment's loop
    pos += e >> 26;
  }

  // One symbol (needs i < count).
  inline void step1(const Tables& t) {
    const uint16_t e = t.single[peek12(p, n, pos)];
    bad |= (e >> 8) == 0;
    sym[i] = static_cast<uint8_t>(e);
    i += bad ? count + 1 : 1;  // a bad code ends the segment's loop
    pos += e >> 8;
  }
};

// Decodes the rest of one segment and checks that its stream ended exactly; "" or what is wrong.
template <bool kMulti>
std::string finish(Cursor& c, const Tables& t) {
  if (kMulti)
    while (!c.bad && c.count - c.i >= 3) c.step3(t);
  while (!c.bad && c.i < c.count) c.step1(t);
  if (c.bad) return "bits at " + std::to_string(c.pos) + " start no code";
  if ((c.pos + 7) / 8 != c.n)
    return "codes take " + std::to_string(c.pos) + " bits but the segment has " + std::to_string(c.n) + " bytes";
  if ((c.pos & 7) && (c.p[c.n - 1] & (0xFF >> (c.pos & 7)))) return "padding bits after the last code are not zero";
  return "";
}

// Two segments side by side: each lookup depends on the previous one of its own stream only, so the two
// dependency chains overlap in the core (about 1.6x the speed of one stream at a time).
template <bool kMulti>
void decode_pair(Cursor& a, Cursor& b, const Tables& t) {
  if (kMulti) {
    while (!a.bad && !b.bad && a.count - a.i >= 3 && b.count - b.i >= 3) {
      a.step3(t);
      b.step3(t);
    }
  } else {
    while (!a.bad && !b.bad && a.i < a.count && b.i < b.count) {
      a.step1(t);
      b.step1(t);
    }
  }
}

// Rows [tok0, tok1) of one plane: decoded symbols (row-major, head_dim per token) + raw bytes -> out.
template <int S>
void merge_rows(const uint8_t* src, const ChunkShape& shape, const Layout& lay, int64_t kv, int64_t head,
                int64_t tok0, int64_t tok1, const uint8_t* sym, uint8_t* out) {
  using T = typename Word<S>::T;
  constexpr int kBits = 8 * S;
  const int64_t dh = shape.head_dim;
  for (int64_t tok = tok0; tok < tok1; ++tok) {
    const int64_t e0 = kv * shape.elements() + (tok * shape.heads + head) * dh;
    const uint8_t* raw = src + lay.raw + e0 * (S - 1);
    const uint8_t* row = sym + (tok - tok0) * dh;
    uint8_t* dst = out + e0 * S;
    for (int64_t d = 0; d < dh; ++d) {
      T w = static_cast<T>(static_cast<T>(row[d]) << (kBits - 8));
      if constexpr (S == 2) {
        w = static_cast<T>(w | raw[d]);
      } else {
        T low = 0;
        std::memcpy(&low, raw + d * (S - 1), S - 1);
        w |= low;
      }
      const T u = static_cast<T>((w >> 1) | (w << (kBits - 1)));  // rotate right: the sign back on top
      std::memcpy(dst + d * S, &u, S);
    }
  }
}

template <int S>
std::string decode_plane(const uint8_t* src, const ChunkShape& shape, const Layout& lay,
                         const std::vector<uint64_t>& seg_offsets, int64_t plane, uint8_t* out) {
  const int64_t head = plane % shape.heads, kv = plane / shape.heads, dh = shape.head_dim;
  auto tables = std::make_unique<Tables>();
  const bool multi = shape.tokens * dh >= kMultiMinSymbols;
  std::string problem = build_tables(src + lay.tables[plane], tables.get(), multi);
  if (!problem.empty()) return "table " + std::to_string(plane) + ": " + problem;
  const int64_t room = lay.seg_tokens * dh + 4;
  std::vector<uint8_t> sym(static_cast<size_t>(2 * room));
  for (int64_t g = 0; g < lay.segs_per_plane; g += 2) {
    Cursor cur[2];
    const int64_t pair = std::min<int64_t>(2, lay.segs_per_plane - g);
    for (int64_t j = 0; j < pair; ++j) {
      const int64_t s = plane * lay.segs_per_plane + g + j;
      const int64_t tok0 = (g + j) * lay.seg_tokens;
      cur[j].p = src + seg_offsets[s];
      cur[j].n = seg_offsets[s + 1] - seg_offsets[s];
      cur[j].count = (std::min(shape.tokens, tok0 + lay.seg_tokens) - tok0) * dh;
      cur[j].sym = sym.data() + j * room;
    }
    if (pair == 2) multi ? decode_pair<true>(cur[0], cur[1], *tables) : decode_pair<false>(cur[0], cur[1], *tables);
    for (int64_t j = 0; j < pair; ++j) {
      problem = multi ? finish<true>(cur[j], *tables) : finish<false>(cur[j], *tables);
      if (!problem.empty()) return "segment " + std::to_string(plane * lay.segs_per_plane + g + j) + ": " + problem;
      const int64_t tok0 = (g + j) * lay.seg_tokens;
      merge_rows<S>(src, shape, lay, kv, head, tok0, tok0 + cur[j].count / dh, cur[j].sym, out);
    }
  }
  return "";
}

}  // namespace

std::vector<uint8_t> encode(const uint8_t* k, const uint8_t* v, const ChunkShape& shape, int64_t seg_tokens,
                            int threads) {
  const Layout lay = layout_for(shape, seg_tokens, 0);  // offsets relative to the raw bytes
  const int64_t planes = 2 * shape.heads;
  std::vector<uint8_t> raw(lay.streams);  // raw bytes, then the directory
  std::vector<std::vector<uint8_t>> tables(static_cast<size_t>(planes));
  std::vector<std::vector<uint8_t>> streams(static_cast<size_t>(planes * lay.segs_per_plane));
  parallel_for(planes, threads, [&](int64_t p) {
    if (shape.itemsize == 2)
      encode_plane<2>(k, v, shape, lay, p, raw.data(), &tables[p], &streams);
    else
      encode_plane<4>(k, v, shape, lay, p, raw.data(), &tables[p], &streams);
  });
  size_t total = kHeaderBytes + raw.size();
  for (const auto& t : tables) total += t.size();
  for (size_t s = 0; s < streams.size(); ++s) {
    store_le32(raw.data() + lay.directory + 4 * s, static_cast<uint32_t>(streams[s].size()));
    total += streams[s].size();
  }
  std::vector<uint8_t> out(kHeaderBytes);
  out.reserve(total);
  store_le32(out.data(), static_cast<uint32_t>(seg_tokens));
  for (const auto& t : tables) out.insert(out.end(), t.begin(), t.end());
  out.insert(out.end(), raw.begin(), raw.end());
  for (const auto& s : streams) out.insert(out.end(), s.begin(), s.end());
  return out;
}

std::string decode(const uint8_t* src, size_t len, uint8_t* out, const ChunkShape& shape, int threads) {
  if (len < kHeaderBytes) return std::to_string(len) + " bytes, shorter than the 4-byte header";
  const int64_t seg_tokens = load_le32(src);
  if (seg_tokens < 1 || seg_tokens > shape.tokens)
    return "seg_tokens " + std::to_string(seg_tokens) + " is outside [1, " + std::to_string(shape.tokens) + "]";
  std::vector<uint64_t> tables(1, kHeaderBytes);
  for (int64_t p = 0; p < 2 * shape.heads; ++p) {
    const uint64_t at = tables.back();
    if (at + kTableHeadBytes > len || src[at] > src[at + 1] || at + table_size(src[at], src[at + 1]) > len)
      return "code table " + std::to_string(p) + " at byte " + std::to_string(at) +
             " is not a table (first symbol above last, or past the " + std::to_string(len) + " bytes)";
    tables.push_back(at + table_size(src[at], src[at + 1]));
  }
  Layout lay = layout_for(shape, seg_tokens, tables.back());
  lay.tables = std::move(tables);
  if (lay.streams > len)
    return std::to_string(len) + " bytes cannot hold the tables, raw bytes and directory (" +
           std::to_string(lay.streams) + " bytes)";
  const int64_t segments = 2 * shape.heads * lay.segs_per_plane;
  std::vector<uint64_t> seg_offsets(static_cast<size_t>(segments + 1));
  seg_offsets[0] = lay.streams;
  for (int64_t s = 0; s < segments; ++s)  // each term < 2**32 and there are < 2**31 of them: no overflow
    seg_offsets[s + 1] = seg_offsets[s] + load_le32(src + lay.directory + 4 * s);
  if (seg_offsets.back() != len)
    return "segment lengths add up to " + std::to_string(seg_offsets.back() - lay.streams) +
           " bytes of streams, but " + std::to_string(len - lay.streams) + " follow the directory";
  std::mutex mu;
  std::string first_problem;
  int64_t first_plane = -1;
  parallel_for(2 * shape.heads, threads, [&](int64_t p) {
    std::string problem = shape.itemsize == 2 ? decode_plane<2>(src, shape, lay, seg_offsets, p, out)
                                              : decode_plane<4>(src, shape, lay, seg_offsets, p, out);
    if (!problem.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      if (first_plane < 0 || p < first_plane) first_plane = p, first_problem = std::move(problem);
    }
  });
  return first_problem;
}

}  // namespace kvfast::expcode
