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
// The chunk layout: header, [v2: repeated rows], 2H code tables, raw bytes, segment directory, bit streams
// ==========================================================================================================
// Half 0 is K, half 1 is V. A half's kept rows are its tokens that are not repeats (v1: all of them); plane p
// (K heads, then V heads) codes the kept rows of its half, seg_tokens rows per segment.
struct Layout {
  int64_t seg_tokens = 0;
  std::vector<int64_t> kept[2];             // kept rows per half, increasing
  std::vector<uint32_t> repeats[2];         // per half: row, source, row, source, ... (rows increasing)
  std::vector<uint64_t> tables;             // [2H + 1] byte offsets: each plane's code table, then its end
  std::vector<int64_t> plane_segments;      // [2H + 1]: each plane's first segment, then the total
  uint64_t raw = 0, directory = 0, streams = 0;  // byte offsets

  int64_t half_of(int64_t plane, const ChunkShape& s) const { return plane / s.heads; }
  int64_t rows(int64_t plane, const ChunkShape& s) const {
    return static_cast<int64_t>(kept[half_of(plane, s)].size());
  }
  // Element index of kept row `row`'s first value of `head` in the raw bytes.
  int64_t raw_element(int64_t half, int64_t row, int64_t head, const ChunkShape& s) const {
    return ((half * static_cast<int64_t>(kept[0].size()) + row) * s.heads + head) * s.head_dim;
  }
};

// Fills kept rows (from the repeats), plane_segments, directory and streams, for raw bytes starting at `raw`.
void finish_layout(const ChunkShape& s, uint64_t raw, Layout* l) {
  for (int half = 0; half < 2; ++half) {
    std::vector<bool> repeated(static_cast<size_t>(s.tokens), false);
    for (size_t i = 0; i < l->repeats[half].size(); i += 2) repeated[l->repeats[half][i]] = true;
    l->kept[half].clear();
    for (int64_t tok = 0; tok < s.tokens; ++tok)
      if (!repeated[tok]) l->kept[half].push_back(tok);
  }
  l->plane_segments.assign(1, 0);
  for (int64_t p = 0; p < 2 * s.heads; ++p)
    l->plane_segments.push_back(l->plane_segments.back() + (l->rows(p, s) + l->seg_tokens - 1) / l->seg_tokens);
  l->raw = raw;
  const uint64_t kept_rows = l->kept[0].size() + l->kept[1].size();
  l->directory = raw + kept_rows * static_cast<uint64_t>(s.heads * s.head_dim) * (s.itemsize - 1);
  l->streams = l->directory + 4 * static_cast<uint64_t>(l->plane_segments.back());
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

// Codes of symbols [first, last] (lengths outside it are 0; codes there are left as they are).
void canonical_codes(const uint8_t lengths[256], uint32_t codes[256], int first = 0, int last = 255) {
  uint32_t count[kMaxCodeBits + 1] = {0}, next[kMaxCodeBits + 2] = {0};
  for (int s = first; s <= last; ++s)
    if (lengths[s]) ++count[lengths[s]];
  uint32_t code = 0;
  for (int n = 1; n <= kMaxCodeBits; ++n) {
    code = (code + count[n - 1]) << 1;
    next[n] = code;
  }
  for (int s = first; s <= last; ++s) codes[s] = lengths[s] ? next[lengths[s]]++ : 0;
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

// (row, source) pairs of the rows [tokens, row_bytes] at `x` that equal an earlier row bit for bit, each with
// the first row it equals, as kvfast/codec/expcode.py's find_repeats. An open-addressing table of the distinct
// rows seen so far, keyed by a hash of the whole row; a row matches only after memcmp says so.
std::vector<uint32_t> find_repeats(const uint8_t* x, int64_t tokens, size_t row_bytes) {
  std::vector<uint32_t> pairs;
  size_t size = 16;
  while (size < 2 * static_cast<size_t>(tokens)) size <<= 1;
  std::vector<int64_t> slot(size, -1);  // row index of a distinct row, or -1
  std::vector<uint64_t> hash(size);
  for (int64_t row = 0; row < tokens; ++row) {
    const uint8_t* r = x + row * row_bytes;
    uint64_t h = 0x9E3779B97F4A7C15ull;
    size_t b = 0;
    for (; b + 8 <= row_bytes; b += 8) {
      uint64_t w;
      std::memcpy(&w, r + b, 8);
      h = (h ^ w) * 0xFF51AFD7ED558CCDull;
    }
    for (; b < row_bytes; ++b) h = (h ^ r[b]) * 0xFF51AFD7ED558CCDull;
    h ^= h >> 29;
    size_t i = h & (size - 1);
    for (; slot[i] >= 0; i = (i + 1) & (size - 1))  // at most half full: a free slot ends every probe
      if (hash[i] == h && std::memcmp(x + slot[i] * row_bytes, r, row_bytes) == 0) break;
    if (slot[i] >= 0) {
      pairs.insert(pairs.end(), {static_cast<uint32_t>(row), static_cast<uint32_t>(slot[i])});
    } else {
      slot[i] = row, hash[i] = h;
    }
  }
  return pairs;
}

template <int S>
void encode_plane(const uint8_t* k, const uint8_t* v, const ChunkShape& shape, const Layout& lay, int64_t plane,
                  uint8_t* raw_bytes, std::vector<uint8_t>* table, std::vector<std::vector<uint8_t>>* streams) {
  using T = typename Word<S>::T;
  constexpr int kBits = 8 * S;
  const int64_t half = lay.half_of(plane, shape), head = plane % shape.heads, dh = shape.head_dim;
  const uint8_t* src = half ? v : k;
  const std::vector<int64_t>& kept = lay.kept[half];
  const int64_t rows = static_cast<int64_t>(kept.size());
  std::vector<uint8_t> symbols(static_cast<size_t>(rows * dh));
  uint64_t freq[256] = {0};
  for (int64_t row = 0; row < rows; ++row) {
    const uint8_t* in = src + (kept[row] * shape.heads + head) * dh * S;
    uint8_t* raw = raw_bytes + lay.raw_element(half, row, head, shape) * (S - 1);
    for (int64_t d = 0; d < dh; ++d) {
      const T u = load_word<S>(in + d * S);
      const T w = static_cast<T>((u << 1) | (u >> (kBits - 1)));
      const uint8_t sym = static_cast<uint8_t>(w >> (kBits - 8));
      symbols[row * dh + d] = sym;
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
  for (int64_t g = 0; lay.plane_segments[plane] + g < lay.plane_segments[plane + 1]; ++g) {
    std::vector<uint8_t>& out = (*streams)[lay.plane_segments[plane] + g];
    const int64_t begin = g * lay.seg_tokens * dh, end = std::min(rows, (g + 1) * lay.seg_tokens) * dh;
    out.reserve(static_cast<size_t>((end - begin) * kMaxCodeBits / 8 + 8));
    BitWriter bits(&out);
    for (int64_t i = begin; i < end; ++i) bits.put(codes[symbols[i]], lengths[symbols[i]]);
    bits.finish();
  }
}

// ==========================================================================================================
// Decoder
// ==========================================================================================================
// Decode tables of one plane, indexed by the next `bits` bits of a stream (MSB first), `bits` being the plane's
// longest code (<= 12): KV planes of a few thousand symbols rarely need 12, and a smaller table is quicker to
// fill, which is most of the cost of a small plane.
//   single[w] = symbol | length << 8 (length 0: the bits start no code)
//   multi[w]  = sym0 | sym1 << 8 | sym2 << 16 | count << 24 | bits << 26: the codes that fit whole in w
struct Tables {
  int bits = 0;
  uint16_t single[1 << kMaxCodeBits];
  uint32_t multi[1 << kMaxCodeBits];
};

// `multi` takes 3 dependent lookups per entry to fill and saves 2 of 3 lookups per symbol decoded: worth it from
// this many symbols per table entry (bench/bench_codec.py: head_dim-128 planes decode faster with it, head_dim-8
// ones slower below 4).
constexpr int64_t kMultiMinSymbolsPerEntry = 4;

// A plane's code lengths as its table stores them: symbols [first, last], the longest length `bits`.
struct CodeLengths {
  uint8_t len[256];
  int first = 0, last = 0, bits = 0;
};

// From the code table at `table` (its size checked against the chunk by decode()); "" or what is wrong.
std::string read_code_table(const uint8_t* table, CodeLengths* c) {
  std::memset(c->len, 0, 256);
  c->first = table[0], c->last = table[1];
  uint32_t kraft = 0;
  c->bits = 0;
  for (int s = c->first; s <= c->last; ++s) {
    const uint8_t byte = table[kTableHeadBytes + (s - c->first) / 2];
    const uint8_t len = (s - c->first) % 2 ? byte >> 4 : byte & 0x0F;
    if (len > kMaxCodeBits) return "a code length exceeds 12 bits";
    c->len[s] = len;
    if (len) kraft += 1u << (kMaxCodeBits - len), c->bits = std::max<int>(c->bits, len);
  }
  if (kraft == 0) return "the code table is empty";
  if (kraft > (1u << kMaxCodeBits)) return "code lengths are over-subscribed (Kraft sum > 1)";
  return "";
}

// Fills t from a plane's code lengths; `multi` only when asked.
void build_tables(const CodeLengths& c, Tables* t, bool multi) {
  const int bits = t->bits = c.bits;
  uint32_t codes[256];
  canonical_codes(c.len, codes, c.first, c.last);
  uint32_t used = 0;  // canonical codes fill the windows [0, used) in order
  for (int s = c.first; s <= c.last; ++s) {
    if (!c.len[s]) continue;
    const int shift = bits - c.len[s];
    const uint16_t entry = static_cast<uint16_t>(s | (c.len[s] << 8));
    std::fill(t->single + (codes[s] << shift), t->single + ((codes[s] + 1) << shift), entry);
    used += 1u << shift;
  }
  const uint32_t size = 1u << bits, mask = size - 1;
  std::fill(t->single + used, t->single + size, uint16_t{0});  // windows that start no code
  if (!multi) return;
  const uint32_t limit = static_cast<uint32_t>(bits);
  for (uint32_t w = 0; w < size; ++w) {  // branch-free: the entries are independent, so lookups overlap
    const uint32_t e1 = t->single[w], l1 = e1 >> 8;
    const uint32_t e2 = t->single[(w << l1) & mask], l2 = e2 >> 8;
    const uint32_t e3 = t->single[(w << (l1 + l2)) & mask], l3 = e3 >> 8;
    const uint32_t ok1 = l1 != 0, ok2 = ok1 & (l2 != 0) & (l1 + l2 <= limit);
    const uint32_t ok3 = ok2 & (l3 != 0) & (l1 + l2 + l3 <= limit);
    const uint32_t taken = ok1 * l1 + ok2 * l2 + ok3 * l3;
    t->multi[w] = ok1 * (e1 & 0xFF) | ok2 * ((e2 & 0xFF) << 8) | ok3 * ((e3 & 0xFF) << 16) |
                  (ok1 + ok2 + ok3) << 24 | taken << 26;
  }
}

// The 64 bits from byte `byte` of stream [p, p + n), MSB first; bytes past the end read as zero.
inline uint64_t load64(const uint8_t* p, uint64_t n, uint64_t byte) {
  uint64_t w = 0;
  if (byte + 8 <= n) {
    std::memcpy(&w, p + byte, 8);
    return __builtin_bswap64(w);
  }
  for (uint64_t i = 0; i < 8; ++i) w = (w << 8) | (byte + i < n ? p[byte + i] : 0);
  return w;
}

// One segment's decoding state: stream [p, p + n), `count` symbols into sym (count + 4 bytes of room).
//
// A step loads the 64 bits at the current byte once (at least 57 of them past `pos`) and then takes
// kTakes codes of at most 12 bits each from that word in registers, so a symbol costs a shift, a table
// lookup and a shift rather than a memory load of its own.
struct Cursor {
  static constexpr int kTakes = 4;  // 4 codes x 12 bits <= 57

  const Tables* t = nullptr;
  const uint8_t* p = nullptr;
  uint64_t n = 0, pos = 0;  // bytes; bits consumed
  int64_t i = 0, count = 0;
  uint8_t* sym = nullptr;
  bool bad = false;  // the bits at pos start no code: the cursor then stops moving
  uint64_t word = 0;  // the bits from pos on, at the top

  int64_t left() const { return count - i; }
  void load() { word = load64(p, n, pos >> 3) << (pos & 7); }

  // Up to three symbols whose codes fit in the next t->bits bits, in one lookup (needs left() >= 3).
  inline void take3() {
    const uint32_t e = t->multi[word >> (64 - t->bits)];
    const uint32_t got = (e >> 24) & 3, bits = e >> 26;
    bad |= got == 0;
    std::memcpy(sym + i, &e, 4);
    i += got;
    pos += bits;
    word <<= bits;
  }

  // One symbol (needs left() >= 1); a bad code writes a symbol but moves no bit.
  inline void take1() {
    const uint16_t e = t->single[word >> (64 - t->bits)];
    const uint32_t bits = e >> 8;
    bad |= bits == 0;
    sym[i++] = static_cast<uint8_t>(e);
    pos += bits;
    word <<= bits;
  }

  // kTakes codes from one load. Works on locals: the symbol stores go through a uint8_t pointer, which may
  // alias anything, so fields would be reloaded after each of them.
  template <bool kMulti>
  inline void step() {
    uint64_t w = load64(p, n, pos >> 3) << (pos & 7), at = pos;
    int64_t k = i;
    uint32_t failed = 0;
    const int shift = 64 - t->bits;
    uint8_t* out = sym;
    for (int take = 0; take < kTakes; ++take) {
      uint32_t bits;
      if (kMulti) {
        const uint32_t e = t->multi[w >> shift];
        const uint32_t got = (e >> 24) & 3;
        failed |= got == 0;
        std::memcpy(out + k, &e, 4);
        k += got;
        bits = e >> 26;
      } else {
        const uint16_t e = t->single[w >> shift];
        bits = e >> 8;
        failed |= bits == 0;
        out[k++] = static_cast<uint8_t>(e);
      }
      at += bits;
      w <<= bits;
    }
    pos = at, i = k, bad |= failed != 0;
  }
};

// N segments side by side: each lookup depends on the previous one of its own stream only, so the N dependency
// chains overlap in the core. Runs rounds that no cursor can overrun, until one is bad or has fewer symbols
// left than a step may take.
template <bool kMulti, int N>
void interleave(Cursor* c) {
  constexpr int64_t kPerStep = Cursor::kTakes * (kMulti ? 3 : 1);
  for (;;) {
    int64_t rounds = INT64_MAX;
    bool bad = false;
    for (int j = 0; j < N; ++j) rounds = std::min(rounds, c[j].left() / kPerStep), bad |= c[j].bad;
    if (bad || rounds == 0) return;
    for (int64_t r = 0; r < rounds; ++r)
      for (int j = 0; j < N; ++j) c[j].template step<kMulti>();
  }
}

// Decodes the rest of one segment and checks that its stream ended exactly; "" or what is wrong.
template <bool kMulti>
std::string finish(Cursor& c) {
  if (kMulti)
    while (!c.bad && c.left() >= 3) c.load(), c.take3();
  while (!c.bad && c.left() > 0) c.load(), c.take1();
  if (c.bad) return "bits at " + std::to_string(c.pos) + " start no code";
  if ((c.pos + 7) / 8 != c.n)
    return "codes take " + std::to_string(c.pos) + " bits but the segment has " + std::to_string(c.n) + " bytes";
  if ((c.pos & 7) && (c.p[c.n - 1] & (0xFF >> (c.pos & 7)))) return "padding bits after the last code are not zero";
  return "";
}

template <bool kMulti>
void interleave_n(Cursor* c, int n) {
  if (n == 4) interleave<kMulti, 4>(c);
  if (n == 3) interleave<kMulti, 3>(c);
  if (n == 2) interleave<kMulti, 2>(c);
}

// One row of dh elements: symbols + raw bytes -> the floats' bytes (restrict: lets the compiler vectorise).
template <int S>
inline void merge_row(const uint8_t* __restrict__ sym, const uint8_t* __restrict__ raw, uint8_t* __restrict__ dst,
                      int64_t dh) {
  using T = typename Word<S>::T;
  constexpr int kBits = 8 * S;
  for (int64_t d = 0; d < dh; ++d) {
    T w = static_cast<T>(static_cast<T>(sym[d]) << (kBits - 8));
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

// Kept rows [row0, row0 + rows) of `plane`: decoded symbols (row-major, head_dim per row) + raw bytes -> out,
// at the tokens the rows stand for.
template <int S>
void merge_rows(const uint8_t* src, const ChunkShape& shape, const Layout& lay, int64_t plane, int64_t row0,
                int64_t rows, const uint8_t* sym, uint8_t* out) {
  const int64_t half = lay.half_of(plane, shape), head = plane % shape.heads, dh = shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* raw = src + lay.raw + lay.raw_element(half, row0 + r, head, shape) * (S - 1);
    const uint8_t* row = sym + r * dh;
    uint8_t* dst = out + (half * shape.elements() + (lay.kept[half][row0 + r] * shape.heads + head) * dh) * S;
    merge_row<S>(row, raw, dst, dh);
  }
}

// Planes [plane0, plane0 + 2): their segments decoded four at a time (two of each plane), then merged.
template <int S>
std::string decode_plane_pair(const uint8_t* src, const ChunkShape& shape, const Layout& lay,
                              const std::vector<uint64_t>& seg_offsets, int64_t plane0, uint8_t* out) {
  const int64_t dh = shape.head_dim;
  std::unique_ptr<Tables[]> tables(new Tables[2]);  // default-initialised: build_tables writes what it reads
  CodeLengths lengths[2];
  for (int j = 0; j < 2; ++j) {
    const std::string problem = read_code_table(src + lay.tables[plane0 + j], &lengths[j]);
    if (!problem.empty()) return "table " + std::to_string(plane0 + j) + ": " + problem;
  }
  // one decoding loop runs both planes' streams: multi-symbol lookups for both or neither
  const bool multi = std::min(lay.rows(plane0, shape) * dh >> lengths[0].bits,
                              lay.rows(plane0 + 1, shape) * dh >> lengths[1].bits) >= kMultiMinSymbolsPerEntry;
  for (int j = 0; j < 2; ++j) build_tables(lengths[j], &tables[j], multi);
  const int64_t room = lay.seg_tokens * dh + 4;
  std::vector<uint8_t> sym(static_cast<size_t>(4 * room));
  const int64_t most = std::max(lay.plane_segments[plane0 + 1] - lay.plane_segments[plane0],
                                lay.plane_segments[plane0 + 2] - lay.plane_segments[plane0 + 1]);
  for (int64_t g = 0; g < most; g += 2) {
    Cursor cur[4];
    int64_t seg[4], plane[4];
    int n = 0;
    for (int j = 0; j < 2; ++j) {
      const int64_t p = plane0 + j;
      for (int64_t h = g; h < g + 2 && lay.plane_segments[p] + h < lay.plane_segments[p + 1]; ++h, ++n) {
        seg[n] = lay.plane_segments[p] + h, plane[n] = p;
        cur[n].t = &tables[j];
        cur[n].p = src + seg_offsets[seg[n]];
        cur[n].n = seg_offsets[seg[n] + 1] - seg_offsets[seg[n]];
        cur[n].count = (std::min(lay.rows(p, shape), (h + 1) * lay.seg_tokens) - h * lay.seg_tokens) * dh;
        cur[n].sym = sym.data() + n * room;
      }
    }
    multi ? interleave_n<true>(cur, n) : interleave_n<false>(cur, n);
    for (int j = 0; j < n; ++j) {
      const std::string problem = multi ? finish<true>(cur[j]) : finish<false>(cur[j]);
      if (!problem.empty()) return "segment " + std::to_string(seg[j]) + ": " + problem;
      const int64_t row0 = (seg[j] - lay.plane_segments[plane[j]]) * lay.seg_tokens;
      merge_rows<S>(src, shape, lay, plane[j], row0, cur[j].count / dh, cur[j].sym, out);
    }
  }
  return "";
}

}  // namespace

std::vector<uint8_t> encode(const uint8_t* k, const uint8_t* v, const ChunkShape& shape, int64_t seg_tokens,
                            bool repeats, int threads) {
  Layout lay;
  lay.seg_tokens = seg_tokens;
  const size_t row_bytes = static_cast<size_t>(shape.heads * shape.head_dim * shape.itemsize);
  if (repeats) {
    parallel_for(2, threads, [&](int64_t half) { lay.repeats[half] = find_repeats(half ? v : k, shape.tokens,
                                                                                   row_bytes); });
  }
  finish_layout(shape, 0, &lay);  // offsets relative to the raw bytes
  const int64_t planes = 2 * shape.heads;
  std::vector<uint8_t> raw(lay.streams);  // raw bytes, then the directory
  std::vector<std::vector<uint8_t>> tables(static_cast<size_t>(planes));
  std::vector<std::vector<uint8_t>> streams(static_cast<size_t>(lay.plane_segments.back()));
  parallel_for(planes, threads, [&](int64_t p) {
    if (shape.itemsize == 2)
      encode_plane<2>(k, v, shape, lay, p, raw.data(), &tables[p], &streams);
    else
      encode_plane<4>(k, v, shape, lay, p, raw.data(), &tables[p], &streams);
  });
  std::vector<uint8_t> head(kHeaderBytes);
  store_le32(head.data(), static_cast<uint32_t>(seg_tokens));
  if (repeats) {
    for (int half = 0; half < 2; ++half) {
      head.resize(head.size() + 4);
      store_le32(head.data() + head.size() - 4, static_cast<uint32_t>(lay.repeats[half].size() / 2));
    }
    for (int half = 0; half < 2; ++half)
      for (uint32_t x : lay.repeats[half]) {
        head.resize(head.size() + 4);
        store_le32(head.data() + head.size() - 4, x);
      }
  }
  size_t total = head.size() + raw.size();
  for (const auto& t : tables) total += t.size();
  for (size_t s = 0; s < streams.size(); ++s) {
    store_le32(raw.data() + lay.directory + 4 * s, static_cast<uint32_t>(streams[s].size()));
    total += streams[s].size();
  }
  std::vector<uint8_t> out = std::move(head);
  out.reserve(total);
  for (const auto& t : tables) out.insert(out.end(), t.begin(), t.end());
  out.insert(out.end(), raw.begin(), raw.end());
  for (const auto& s : streams) out.insert(out.end(), s.begin(), s.end());
  return out;
}

namespace {

// v2's repeated rows at [at, len): checked as §7.2 says; "" or what is wrong. Sets *end past them.
std::string parse_repeats(const uint8_t* src, size_t len, const ChunkShape& shape, Layout* lay, uint64_t* end) {
  const uint64_t at = kHeaderBytes + 8;
  if (len < at) return std::to_string(len) + " bytes, shorter than the 12-byte header";
  const uint64_t counts[2] = {load_le32(src + kHeaderBytes), load_le32(src + kHeaderBytes + 4)};
  if (counts[0] >= static_cast<uint64_t>(shape.tokens) || counts[1] >= static_cast<uint64_t>(shape.tokens))
    return "[" + std::to_string(counts[0]) + ", " + std::to_string(counts[1]) + "] repeated rows, but a chunk of " +
           std::to_string(shape.tokens) + " tokens has at most " + std::to_string(shape.tokens - 1) + " per half";
  *end = at + 8 * (counts[0] + counts[1]);
  if (*end > len)
    return std::to_string(len) + " bytes cannot hold the " + std::to_string(counts[0] + counts[1]) +
           " repeated-row pairs";
  uint64_t next = at;
  std::vector<bool> repeated(static_cast<size_t>(shape.tokens));
  for (int half = 0; half < 2; ++half) {
    std::vector<uint32_t>& pairs = lay->repeats[half];
    pairs.resize(2 * counts[half]);
    for (uint32_t& x : pairs) x = load_le32(src + next), next += 4;
    std::fill(repeated.begin(), repeated.end(), false);
    bool ok = true;
    for (size_t i = 0; ok && i < pairs.size(); i += 2) {
      ok = pairs[i] < shape.tokens && pairs[i + 1] < pairs[i] && (i == 0 || pairs[i - 2] < pairs[i]);
      if (ok) repeated[pairs[i]] = true;
    }
    for (size_t i = 0; ok && i < pairs.size(); i += 2) ok = !repeated[pairs[i + 1]];
    if (!ok)
      return std::string("the repeated ") + "KV"[half] + " rows are not increasing rows < " +
             std::to_string(shape.tokens) + ", each with an earlier source that is not itself repeated";
  }
  return "";
}

}  // namespace

std::string decode(const uint8_t* src, size_t len, uint8_t* out, const ChunkShape& shape, bool repeats,
                   int threads) {
  if (len < kHeaderBytes) return std::to_string(len) + " bytes, shorter than the 4-byte header";
  Layout lay;
  lay.seg_tokens = load_le32(src);
  if (lay.seg_tokens < 1 || lay.seg_tokens > shape.tokens)
    return "seg_tokens " + std::to_string(lay.seg_tokens) + " is outside [1, " + std::to_string(shape.tokens) + "]";
  uint64_t at = kHeaderBytes;
  if (repeats) {
    const std::string problem = parse_repeats(src, len, shape, &lay, &at);
    if (!problem.empty()) return problem;
  }
  lay.tables.assign(1, at);
  for (int64_t p = 0; p < 2 * shape.heads; ++p) {
    at = lay.tables.back();
    if (at + kTableHeadBytes > len || src[at] > src[at + 1] || at + table_size(src[at], src[at + 1]) > len)
      return "code table " + std::to_string(p) + " at byte " + std::to_string(at) +
             " is not a table (first symbol above last, or past the " + std::to_string(len) + " bytes)";
    lay.tables.push_back(at + table_size(src[at], src[at + 1]));
  }
  finish_layout(shape, lay.tables.back(), &lay);
  if (lay.streams > len)
    return std::to_string(len) + " bytes cannot hold the tables, raw bytes and directory (" +
           std::to_string(lay.streams) + " bytes)";
  const int64_t segments = lay.plane_segments.back();
  std::vector<uint64_t> seg_offsets(static_cast<size_t>(segments + 1));
  seg_offsets[0] = lay.streams;
  for (int64_t s = 0; s < segments; ++s)  // each term < 2**32 and there are < 2**31 of them: no overflow
    seg_offsets[s + 1] = seg_offsets[s] + load_le32(src + lay.directory + 4 * s);
  if (seg_offsets.back() != len)
    return "segment lengths add up to " + std::to_string(seg_offsets.back() - lay.streams) +
           " bytes of streams, but " + std::to_string(len - lay.streams) + " follow the directory";
  std::mutex mu;
  std::string first_problem;
  int64_t first_pair = -1;
  parallel_for(shape.heads, threads, [&](int64_t pair) {  // 2H planes, two at a time
    std::string problem = shape.itemsize == 2 ? decode_plane_pair<2>(src, shape, lay, seg_offsets, 2 * pair, out)
                                              : decode_plane_pair<4>(src, shape, lay, seg_offsets, 2 * pair, out);
    if (!problem.empty()) {
      std::lock_guard<std::mutex> lock(mu);
      if (first_pair < 0 || pair < first_pair) first_pair = pair, first_problem = std::move(problem);
    }
  });
  if (!first_problem.empty()) return first_problem;
  const size_t row_bytes = static_cast<size_t>(shape.heads * shape.head_dim * shape.itemsize);
  for (int half = 0; half < 2; ++half) {  // sources are kept rows, all written above
    uint8_t* base = out + half * shape.elements() * shape.itemsize;
    const std::vector<uint32_t>& pairs = lay.repeats[half];
    for (size_t i = 0; i < pairs.size(); i += 2)
      std::memcpy(base + pairs[i] * row_bytes, base + pairs[i + 1] * row_bytes, row_bytes);
  }
  return "";
}

}  // namespace kvfast::expcode
