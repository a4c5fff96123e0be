// The load job (paged_loader.h): plan -> worker threads -> per-chunk direct or staged copy -> layer signals.
#include "paged_loader.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "stream_copy.h"

namespace kvfast {

// ==========================================================================================================
// per-worker memory
// ==========================================================================================================
struct WorkerScratch {
  SourceScratch source;
  uint8_t* staging = nullptr;  // [staging_rows, H, head_bytes], 4096-aligned: the staged path's landing area
  std::vector<iovec> iov;      // [max_iov]: one preadv call's pieces
};

namespace {

int max_iov() {
  long n = sysconf(_SC_IOV_MAX);  // 1024 on Linux
  return n > 0 ? static_cast<int>(std::min<long>(n, 1024)) : 16;
}

uint64_t round_up(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

}  // namespace

// ==========================================================================================================
// setup and teardown
// ==========================================================================================================
LoadJob::LoadJob(int fd, std::vector<ChunkSpec> plan, PageLayouts layouts, std::vector<LayerDest> dests,
                 std::vector<int64_t> block_table, int64_t num_tokens, LoadOptions options,
                 std::shared_ptr<ChunkSink> sink)
    : plan_(std::move(plan)),
      layouts_(layouts),
      dests_(std::move(dests)),
      block_table_(std::move(block_table)),
      num_tokens_(num_tokens),
      options_(options),
      sink_(std::move(sink)) {
  uint64_t file_end = 0;
  for (const ChunkSpec& c : plan_) {
    max_chunk_bytes_ = std::max(max_chunk_bytes_, c.length);
    file_end = std::max(file_end, c.offset + c.length);
  }
  const size_t num_layers = dests_.size();
  remaining_.reset(new std::atomic<int64_t>[num_layers]);
  for (size_t l = 0; l < num_layers; ++l) remaining_[l] = 0;
  for (const ChunkSpec& c : plan_) ++remaining_[c.layer];
  layer_done_.assign(num_layers, 0);
  for (size_t l = 0; l < num_layers; ++l) layer_done_[l] = remaining_[l] == 0;

  Status opened;
  source_ = FileSource::open(fd, options_.method, file_end, max_chunk_bytes_, options_.piece_bytes, &opened);
  if (!source_) throw SourceError(opened);

  const int n = std::max(1, std::min<int>(options_.threads, static_cast<int>(plan_.size())));
  scratch_.resize(n);
  const int iov_count = max_iov();
  for (WorkerScratch& w : scratch_) {
    if (!sink_) {  // a sink brings its own staging
      const uint64_t staging_bytes = round_up(static_cast<uint64_t>(staging_rows(layouts_[0].row_bytes()) *
                                                                    layouts_[0].row_bytes()), 4096);
      w.staging = static_cast<uint8_t*>(std::aligned_alloc(4096, staging_bytes));
    }
    if ((!sink_ && !w.staging) || !source_->alloc_scratch(&w.source)) {
      release_scratch();
      throw std::bad_alloc();
    }
    w.iov.resize(iov_count);
  }
  running_ = n;
  try {
    for (int i = 0; i < n; ++i) threads_.emplace_back(&LoadJob::worker, this, &scratch_[i]);
  } catch (...) {  // could not start a thread: stop the ones that did, then report
    {
      std::lock_guard<std::mutex> lock(mutex_);
      running_ -= n - static_cast<int>(threads_.size());
    }
    cancel();
    for (std::thread& t : threads_) t.join();
    release_scratch();
    throw;
  }
}

LoadJob::~LoadJob() {
  cancel();
  for (std::thread& t : threads_) t.join();
  release_scratch();
}

void LoadJob::release_scratch() {
  for (WorkerScratch& w : scratch_) {
    std::free(w.staging);
    w.staging = nullptr;
    FileSource::free_scratch(&w.source);
  }
}

// ==========================================================================================================
// workers
// ==========================================================================================================
// Chunks are taken in file order from one counter, so layers complete (nearly) in order: layer 0's
// attention can start while later layers are still being read.
void LoadJob::worker(WorkerScratch* w) {
  const int64_t count = static_cast<int64_t>(plan_.size());
  for (;;) {
    const int64_t pos = next_.fetch_add(1);
    if (pos >= count || pos > first_error_.load()) break;
    const ChunkSpec& c = plan_[pos];
    Status s = source_->begin_chunk(c.offset, c.length, &w->source);
    if (s.ok() && sink_) {
      s = sink_->load(c, static_cast<int>(w - scratch_.data()), *source_, &w->source);
    } else if (s.ok()) {
      const bool direct = layouts_[0].rows_contiguous() && layouts_[1].rows_contiguous() && c.stop <= num_tokens_;
      s = direct ? load_direct(c, w) : load_staged(c, w);
    }
    if (s.ok()) s = chunk_done(c.layer);
    if (!s.ok()) fail(pos, std::move(s));
  }
  std::free(w->staging);  // done with this worker's buffers: a finished job holds no large memory
  w->staging = nullptr;
  FileSource::free_scratch(&w->source);
  std::lock_guard<std::mutex> lock(mutex_);
  if (--running_ == 0) cv_.notify_all();
}

// Direct: iovecs point into the destination blocks. K's tokens [a, b) are runs of at most block_size tokens
// (block_table gives each run's block), then V's; pieces of piece_bytes go to one read() each and are
// checksummed right away, in file order, so the CRC continues exactly as the file's (K then V).
Status LoadJob::load_direct(const ChunkSpec& c, WorkerScratch* w) {
  const int64_t bs = layouts_[0].block_size;
  const uint64_t row = static_cast<uint64_t>(layouts_[0].row_bytes());
  const uint64_t piece_bytes = options_.piece_bytes;
  const int iov_cap = static_cast<int>(w->iov.size());
  iovec* iov = w->iov.data();
  int iovcnt = 0;
  uint64_t piece = 0;             // bytes in iov[0..iovcnt)
  uint64_t piece_at = c.offset;   // file offset of iov[0]
  uint32_t crc = 0;

  auto flush = [&]() -> Status {
    Status s = source_->read(piece_at, iov, iovcnt, piece, &w->source, options_.verify ? &crc : nullptr, true);
    if (!s.ok()) return s;
    piece_at += piece;
    piece = 0;
    iovcnt = 0;
    return {};
  };

  for (int kv = 0; kv < 2; ++kv) {
    uint8_t* pages = dests_[c.layer].pages[kv];
    const PagedLayout& layout = layouts_[kv];
    for (int64_t t = c.start; t < c.stop;) {
      const int64_t block_offset = t % bs;
      const int64_t run = std::min(bs - block_offset, c.stop - t);
      uint8_t* dst = pages + block_table_[t / bs] * layout.block_stride + block_offset * layout.token_stride;
      uint64_t left = static_cast<uint64_t>(run) * row;
      while (left > 0) {  // a run longer than what is left of the piece is split across pieces
        const uint64_t take = std::min(left, piece_bytes - piece);
        iov[iovcnt++] = {dst, take};
        piece += take;
        dst += take;
        left -= take;
        if (piece == piece_bytes || iovcnt == iov_cap) {
          Status s = flush();
          if (!s.ok()) return s;
        }
      }
      t += run;
    }
  }
  if (iovcnt > 0) {
    Status s = flush();
    if (!s.ok()) return s;
  }
  if (options_.verify && crc != c.crc32c) return {ErrorKind::kChecksum, 0, c.offset, "checksum mismatch"};
  return {};
}

// Staged: whole token rows (K rows, then V rows) land in the worker's staging buffer a piece at a time; each
// piece is checksummed there and its rows below num_tokens scattered into the pages at the layout's strides,
// a run of tokens of one block at a time, while it is still in L2. Contiguous head rows are written with
// streaming stores, fenced once at the end.
Status LoadJob::load_staged(const ChunkSpec& c, WorkerScratch* w) {
  const int64_t bs = layouts_[0].block_size;
  const int64_t row = layouts_[0].row_bytes();
  const int64_t tokens = c.stop - c.start;
  const int64_t rows_per_piece = staging_rows(row);
  uint32_t crc = 0;
  for (int64_t r0 = 0; r0 < 2 * tokens; r0 += rows_per_piece) {  // row r: K of token r, or V of r - tokens
    const int64_t rows = std::min(rows_per_piece, 2 * tokens - r0);
    const uint64_t bytes = static_cast<uint64_t>(rows * row);
    const iovec piece = {w->staging, bytes};  // [rows, H, head_bytes]
    Status s = source_->read(c.offset + static_cast<uint64_t>(r0 * row), &piece, 1, bytes, &w->source,
                             options_.verify ? &crc : nullptr, false);
    if (!s.ok()) return s;
    const int64_t end = r0 + rows;
    for (int64_t r = r0; r < end;) {
      const int kv = r < tokens ? 0 : 1;
      const int64_t first = kv ? tokens : 0;  // row of the chunk's first token in this half (K or V)
      const int64_t half_end = std::min(end, first + tokens);
      const int64_t t = c.start + (r - first);
      const int64_t stored = std::min(half_end - r, num_tokens_ - t);
      if (stored <= 0) {  // a prefix load's last chunk: read for its checksum, not stored
        r = half_end;
        continue;
      }
      const int64_t run = std::min(stored, bs - t % bs);
      scatter_rows(kv, dests_[c.layer].pages[kv] + block_table_[t / bs] * layouts_[kv].block_stride +
                           (t % bs) * layouts_[kv].token_stride,
                   w->staging + (r - r0) * row, run);
      r += run;
    }
  }
  stream_fence();
  if (options_.verify && crc != c.crc32c) return {ErrorKind::kChecksum, 0, c.offset, "checksum mismatch"};
  return {};
}

namespace {

// Transposed heads (vLLM CPU's K: each block's head plane is [D, block_size], tokens contiguous) are written in
// square tiles of one 16-byte vector per side: W staged token rows are loaded, transposed in registers and stored
// as W runs of tokens, one per element of D. An element at a time, the staged reads -- one per token, rows apart
// by a power of two -- fall into the same few L1 sets and miss there; the tiles read 16 bytes of each row at once.
#if defined(__SSE2__)
constexpr bool kVectorTiles = true;

// W x W elements transposed: `from` rows `from_stride` bytes apart -> `to` rows `to_stride` apart; W = 16 /
// sizeof(T). A load turns a token's elements into an element's tokens, a gather the reverse.
template <class T>
void transpose_tile(uint8_t* to, int64_t to_stride, const uint8_t* from, int64_t from_stride) {
  auto load = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + i * from_stride)); };
  auto store = [&](int i, __m128i x) { _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i * to_stride), x); };
  if constexpr (sizeof(T) == 2) {
    __m128i a[8], b[8];
    for (int i = 0; i < 4; ++i) {  // pairs of rows, interleaved by 16 bits
      a[2 * i] = _mm_unpacklo_epi16(load(2 * i), load(2 * i + 1));
      a[2 * i + 1] = _mm_unpackhi_epi16(load(2 * i), load(2 * i + 1));
    }
    for (int i = 0; i < 2; ++i) {  // then quads, by 32 bits: b[4i + c/2] holds columns c, c+1 of rows 4i..4i+3
      b[4 * i] = _mm_unpacklo_epi32(a[4 * i], a[4 * i + 2]);
      b[4 * i + 1] = _mm_unpackhi_epi32(a[4 * i], a[4 * i + 2]);
      b[4 * i + 2] = _mm_unpacklo_epi32(a[4 * i + 1], a[4 * i + 3]);
      b[4 * i + 3] = _mm_unpackhi_epi32(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {  // then the two halves of each column, by 64 bits
      store(2 * c, _mm_unpacklo_epi64(b[c], b[4 + c]));
      store(2 * c + 1, _mm_unpackhi_epi64(b[c], b[4 + c]));
    }
  } else {
    static_assert(sizeof(T) == 4, "tiles of 2- or 4-byte elements");
    const __m128i a0 = _mm_unpacklo_epi32(load(0), load(1)), a1 = _mm_unpackhi_epi32(load(0), load(1));
    const __m128i a2 = _mm_unpacklo_epi32(load(2), load(3)), a3 = _mm_unpackhi_epi32(load(2), load(3));
    store(0, _mm_unpacklo_epi64(a0, a2));
    store(1, _mm_unpackhi_epi64(a0, a2));
    store(2, _mm_unpacklo_epi64(a1, a3));
    store(3, _mm_unpackhi_epi64(a1, a3));
  }
}
#else
constexpr bool kVectorTiles = false;
template <class T>
void transpose_tile(uint8_t*, int64_t, const uint8_t*, int64_t) {}
#endif

// One head's D elements of `run` tokens between packed rows (`row` bytes apart, elements packed) and a page head
// whose elements lie `es` bytes apart and tokens `ts` apart: into the head when kToPages (a load), out of it
// otherwise (a gather). The loop over the head's smaller stride is innermost, so its accesses move forward
// through memory; transposed heads go through the tiles, a transpose being its own inverse.
template <class T, bool kToPages>
void copy_head(uint8_t* head, uint8_t* rows, int64_t run, int64_t row, int64_t dims, int64_t ts, int64_t es) {
  constexpr int64_t item = sizeof(T);
  auto copy = [&](int64_t i, int64_t e) {
    uint8_t* in_head = head + i * ts + e * es;
    uint8_t* in_rows = rows + i * row + e * item;
    std::memcpy(kToPages ? in_head : in_rows, kToPages ? in_rows : in_head, sizeof(T));
  };
  if (es > ts) {  // tokens innermost in memory
    int64_t tiled_tokens = 0, tiled_dims = 0;
    if constexpr (kVectorTiles && item <= 4) {
      constexpr int64_t w = 16 / item;
      if (ts == item) {
        tiled_tokens = run / w * w;
        tiled_dims = dims / w * w;
        for (int64_t i = 0; i < tiled_tokens; i += w)
          for (int64_t e = 0; e < tiled_dims; e += w) {
            if constexpr (kToPages)
              transpose_tile<T>(head + e * es + i * item, es, rows + i * row + e * item, row);
            else
              transpose_tile<T>(rows + i * row + e * item, row, head + e * es + i * item, es);
          }
      }
    }
    for (int64_t e = 0; e < dims; ++e)  // what the tiles left: the last dims, then the last tokens
      for (int64_t i = e < tiled_dims ? tiled_tokens : 0; i < run; ++i) copy(i, e);
  } else {
    for (int64_t i = 0; i < run; ++i)
      for (int64_t e = 0; e < dims; ++e) copy(i, e);
  }
}

// `run` packed token rows and the same tokens of one block, from its token row `page` on: into the block when
// kToPages (a load), out of it otherwise (a gather).
template <bool kToPages>
void copy_block_rows(const PagedLayout& l, uint8_t* page, uint8_t* rows, int64_t run) {
  const int64_t row = l.row_bytes();
  if (l.head_contiguous()) {
    // A load streams past the caches (the pages are not read soon; stream_fence follows the chunk); a gather's
    // rows are read next, so they are stored plainly.
    auto copy = [](uint8_t* in_page, uint8_t* in_rows, int64_t n) {
      if constexpr (kToPages) stream_copy(in_page, in_rows, static_cast<size_t>(n));
      else std::memcpy(in_rows, in_page, static_cast<size_t>(n));
    };
    for (int64_t i = 0; i < run; ++i, page += l.token_stride, rows += row) {
      if (l.head_stride == l.head_bytes) {
        copy(page, rows, row);
      } else {
        for (int64_t h = 0; h < l.num_heads; ++h) copy(page + h * l.head_stride, rows + h * l.head_bytes, l.head_bytes);
      }
    }
    return;
  }
  const int64_t dims = l.head_bytes / l.elem_bytes;
  for (int64_t h = 0; h < l.num_heads; ++h) {
    uint8_t* p = page + h * l.head_stride;
    uint8_t* r = rows + h * l.head_bytes;
    switch (l.elem_bytes) {  // the binding admits these widths only
      case 2:
        copy_head<uint16_t, kToPages>(p, r, run, row, dims, l.token_stride, l.elem_stride);
        break;
      case 4:
        copy_head<uint32_t, kToPages>(p, r, run, row, dims, l.token_stride, l.elem_stride);
        break;
      default:
        copy_head<uint64_t, kToPages>(p, r, run, row, dims, l.token_stride, l.elem_stride);
    }
  }
}

}  // namespace

void LoadJob::scatter_rows(int kv, uint8_t* dst, const uint8_t* rows, int64_t run) const {
  copy_block_rows<true>(layouts_[kv], dst, const_cast<uint8_t*>(rows), run);  // rows are only read
}

void gather_pages(const PagedLayout& l, const uint8_t* pages, const std::vector<int64_t>& block_table,
                  int64_t num_tokens, uint8_t* out) {
  const int64_t bs = l.block_size;
  for (int64_t t = 0; t < num_tokens; t += bs) {
    uint8_t* block = const_cast<uint8_t*>(pages) + block_table[t / bs] * l.block_stride;  // only read
    copy_block_rows<false>(l, block, out + t * l.row_bytes(), std::min(bs, num_tokens - t));
  }
}

int64_t LoadJob::staging_rows(int64_t row) const {
  return std::max<int64_t>(1, static_cast<int64_t>(options_.piece_bytes) / row);
}

// ==========================================================================================================
// completion and failure
// ==========================================================================================================
Status LoadJob::chunk_done(int64_t layer) {
  if (remaining_[layer].fetch_sub(1) == 1) {
    if (sink_) {
      Status s = sink_->layer_complete(layer);
      if (!s.ok()) return s;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    layer_done_[layer] = 1;
    cv_.notify_all();
  }
  return {};
}

// Keeps the failure with the lowest plan position, so the error names the same chunk a sequential reader
// would stop at: every position below it was already taken by some worker and still runs to its end.
void LoadJob::fail(int64_t plan_pos, Status s) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_.kind == ErrorKind::kNone || plan_pos < error_.plan_pos) {
    error_ = {s.kind, plan_pos, s.err, s.offset, std::move(s.detail)};
  }
  int64_t seen = first_error_.load();
  while (plan_pos < seen && !first_error_.compare_exchange_weak(seen, plan_pos)) {
  }
}

void LoadJob::cancel() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (running_ == 0) return;
  if (error_.kind == ErrorKind::kNone) error_ = {ErrorKind::kCancelled, -1, 0, 0, "cancelled"};
  first_error_ = -1;  // every position is past it: workers stop after their current chunk
}

bool LoadJob::layer_ready(int64_t layer) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return layer_done_[layer] != 0;
}

bool LoadJob::finished() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_ == 0;
}

LoadError LoadJob::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

namespace {
template <class Pred>
bool wait_for(std::condition_variable& cv, std::unique_lock<std::mutex>& lock, double timeout_s, Pred pred) {
  if (timeout_s < 0) {
    cv.wait(lock, pred);
    return true;
  }
  return cv.wait_for(lock, std::chrono::duration<double>(timeout_s), pred);
}
}  // namespace

bool LoadJob::wait_layer(int64_t layer, double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  return wait_for(cv_, lock, timeout_s, [&] { return layer_done_[layer] != 0 || running_ == 0; });
}

bool LoadJob::wait(double timeout_s) {
  std::unique_lock<std::mutex> lock(mutex_);
  return wait_for(cv_, lock, timeout_s, [&] { return running_ == 0; });
}

}  // namespace kvfast
