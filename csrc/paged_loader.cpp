// The load job (paged_loader.h): plan -> worker threads -> per-chunk direct or staged copy -> layer signals.
#include "paged_loader.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>

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
LoadJob::LoadJob(int fd, std::vector<ChunkSpec> plan, PagedLayout layout, std::vector<LayerDest> dests,
                 std::vector<int64_t> block_table, int64_t num_tokens, LoadOptions options,
                 std::shared_ptr<ChunkSink> sink)
    : plan_(std::move(plan)),
      layout_(layout),
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
      const uint64_t staging_bytes = round_up(static_cast<uint64_t>(staging_rows(layout_.row_bytes()) *
                                                                    layout_.row_bytes()), 4096);
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
      s = (layout_.rows_contiguous() && c.stop <= num_tokens_) ? load_direct(c, w) : load_staged(c, w);
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
  const int64_t bs = layout_.block_size;
  const uint64_t row = static_cast<uint64_t>(layout_.row_bytes());
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
    for (int64_t t = c.start; t < c.stop;) {
      const int64_t block_offset = t % bs;
      const int64_t run = std::min(bs - block_offset, c.stop - t);
      uint8_t* dst = pages + block_table_[t / bs] * layout_.block_stride + block_offset * layout_.token_stride;
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
// while it is still in L2. The pages are written with streaming stores, fenced once at the end.
Status LoadJob::load_staged(const ChunkSpec& c, WorkerScratch* w) {
  const int64_t bs = layout_.block_size;
  const int64_t row = layout_.row_bytes();
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
    for (int64_t r = r0; r < r0 + rows; ++r) {
      const int kv = r < tokens ? 0 : 1;
      const int64_t t = c.start + (kv ? r - tokens : r);
      if (t >= num_tokens_) continue;  // a prefix load's last chunk: read for its checksum, not stored
      uint8_t* dst = dests_[c.layer].pages[kv] + block_table_[t / bs] * layout_.block_stride +
                     (t % bs) * layout_.token_stride;
      const uint8_t* token = w->staging + (r - r0) * row;
      if (layout_.head_stride == layout_.head_bytes) {
        stream_copy(dst, token, static_cast<size_t>(row));
      } else {
        for (int64_t h = 0; h < layout_.num_heads; ++h)
          stream_copy(dst + h * layout_.head_stride, token + h * layout_.head_bytes,
                      static_cast<size_t>(layout_.head_bytes));
      }
    }
  }
  stream_fence();
  if (options_.verify && crc != c.crc32c) return {ErrorKind::kChecksum, 0, c.offset, "checksum mismatch"};
  return {};
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
