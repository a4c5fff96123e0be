// File -> paged KV cache in host memory: a small pool of threads reads a .kvf file's chunks straight into the
// cache's blocks, checksumming each piece right after it lands, and signals each layer as it completes.
//
//   chunk c (layer l, tokens [a, b)) in the file:   K [b-a, H, D] | V [b-a, H, D]        (docs/FORMAT.md §6)
//   destination (one per layer and K/V):             pages [num_blocks, block_size, H, D] at byte strides,
//                                                    D's elements contiguous or themselves strided
//   token t goes to block block_table[t / block_size], row t % block_size.
//
// Two ways through a chunk:
//   direct   pages whose token rows are contiguous (NHD): K rows of a chunk are runs of up to block_size
//            tokens inside blocks, so one preadv per piece with iovecs pointing into the blocks does the only
//            copy, page cache -> cache; the checksum then runs over those destination bytes, still in L2.
//   staged   any other page layout (HND, strided views, D strided as in vLLM CPU's K, which keeps each
//            block's head plane as [D, block_size]) and a prefix load's last, partly used chunk: pieces of whole
//            token rows go into the worker's staging buffer, are checksummed there and scattered into the pages
//            while still in L2.
//
// Validation happens once, in the binding glue (bindings.cpp) and the Python caller: the job assumes its plan
// and destinations are consistent, and only has to survive the file changing underneath it.
//
// A GPU destination plugs in as a ChunkSink (csrc/cuda/gpu_sink.h): the same workers, plan, failure handling
// and per-layer counters, with each chunk read into a pinned staging slot and handed to a CUDA stream.
#pragma once
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "file_source.h"

namespace kvfast {

// One chunk of the validated index (kvfast.format.ChunkInfo).
struct ChunkSpec {
  int64_t index;    // position in the file's chunk index, for error messages
  int64_t layer;    // destination layer
  int64_t start;    // first token held
  int64_t stop;     // one past the last token held
  uint64_t offset;  // absolute file offset of K then V
  uint64_t length;  // stored bytes: 2 * (stop - start) * row_bytes (codec "raw")
  uint32_t crc32c;  // of the stored bytes, K then V
};

// The geometry shared by every destination page array. Byte strides. A head row (head_bytes) is contiguous unless
// elem_bytes says otherwise.
struct PagedLayout {
  int64_t num_blocks = 0;
  int64_t block_size = 0;  // tokens per block
  int64_t num_heads = 0;
  int64_t head_bytes = 0;  // head_dim * itemsize
  int64_t block_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  // A head row's D elements of elem_bytes each lie elem_stride bytes apart. elem_bytes 0 (the default, and what
  // the binding stores whenever elem_stride == elem_bytes) means the row is contiguous: the GPU sinks need that.
  int64_t elem_bytes = 0;
  int64_t elem_stride = 0;

  int64_t row_bytes() const { return num_heads * head_bytes; }  // one token of K (or V) in the file
  bool head_contiguous() const { return elem_bytes == 0; }
  // NHD pages: a run of tokens within one block is one contiguous range of bytes.
  bool rows_contiguous() const {
    return head_contiguous() && head_stride == head_bytes && token_stride == row_bytes();
  }
};

// Where one layer goes: K pages and V pages, each laid out as its PagedLayout says.
struct LayerDest {
  uint8_t* pages[2];  // [0] K, [1] V: [num_blocks, block_size, H, head_bytes] at the layouts' strides
};

// K's layout and V's: the same shape, each its own strides (vLLM CPU keeps K transposed inside a block, not V).
using PageLayouts = std::array<PagedLayout, 2>;

struct LoadOptions {
  Method method = Method::kPreadv;
  int threads = 1;
  bool verify = true;
  uint64_t piece_bytes = 256 << 10;  // bytes per read+checksum step: small enough to stay in L2
};

// The first failure of a load: which chunk (position in the plan) and why.
struct LoadError {
  ErrorKind kind = ErrorKind::kNone;
  int64_t plan_pos = -1;  // index into the plan given to LoadJob
  int err = 0;            // errno for kOs
  uint64_t offset = 0;    // file offset where it was seen
  std::string detail;
};

// The file could not be opened with the requested method (e.g. O_DIRECT on a filesystem without it).
struct SourceError : std::runtime_error {
  explicit SourceError(Status s) : std::runtime_error(s.detail), status(std::move(s)) {}
  Status status;
};

struct WorkerScratch;

// A destination the job does not write itself: a GPU's paged cache (csrc/cuda/gpu_sink.h). Worker `worker`
// hands it each chunk it takes, right after the source's begin_chunk; layer_complete(l) is called once, by the
// worker whose chunk was the layer's last to return from load(). Both are called from worker threads.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  virtual Status load(const ChunkSpec& c, int worker, FileSource& source, SourceScratch* scratch) = 0;
  virtual Status layer_complete(int64_t layer) = 0;
};

// Tokens [0, num_tokens) of the sequence over `block_table` (its ids checked by check_block_table), out of pages
// laid out as `layout` into `out`: packed rows [num_tokens, H, head_bytes], as a .kvf chunk holds them. The
// mirror of a load's scatter (vLLM CPU's transposed K included); one thread, the caller's.
void gather_pages(const PagedLayout& layout, const uint8_t* pages, const std::vector<int64_t>& block_table,
                  int64_t num_tokens, uint8_t* out);

// One load in flight. Starts its threads in the constructor; the destructor cancels and joins them.
class LoadJob {
 public:
  // fd: an open .kvf file (the job uses its own duplicate). plan: the chunks to load, in file order (layer-
  // major). layouts: of every layer's K pages and V pages (shapes equal). dests: [num_layers]. block_table: [>= ceil(num_tokens / block_size)] block ids. Tokens
  // [0, num_tokens) are loaded; a chunk's tokens at or past num_tokens are read (to check its checksum) but
  // not stored. Throws SourceError when the file cannot be opened with the method, std::bad_alloc or
  // std::system_error when buffers or threads cannot be had. With a sink, the sink writes each chunk (`dests`
  // then only sizes the layer count) and the job's workers are numbered 0.. for it.
  LoadJob(int fd, std::vector<ChunkSpec> plan, PageLayouts layouts, std::vector<LayerDest> dests,
          std::vector<int64_t> block_table, int64_t num_tokens, LoadOptions options,
          std::shared_ptr<ChunkSink> sink = nullptr);
  ~LoadJob();
  LoadJob(const LoadJob&) = delete;
  LoadJob& operator=(const LoadJob&) = delete;

  bool layer_ready(int64_t layer) const;
  // Block until `layer` is ready or the whole job finished (success or failure), at most timeout_s seconds
  // (< 0: no limit). Returns whether that happened.
  bool wait_layer(int64_t layer, double timeout_s);
  bool wait(double timeout_s);  // until every worker stopped
  bool finished() const;
  LoadError error() const;  // kind == kNone after a successful load
  void cancel();

 private:
  void worker(WorkerScratch* w);
  Status load_direct(const ChunkSpec& c, WorkerScratch* w);
  Status load_staged(const ChunkSpec& c, WorkerScratch* w);
  // `run` staged token rows (consecutive tokens of one block, all K or all V as `kv` says) into that block, from
  // token row `dst` on.
  void scatter_rows(int kv, uint8_t* dst, const uint8_t* rows, int64_t run) const;
  int64_t staging_rows(int64_t row_bytes) const;  // token rows per staged piece: piece_bytes of them, >= 1
  void fail(int64_t plan_pos, Status s);
  Status chunk_done(int64_t layer);
  void release_scratch();

  std::vector<ChunkSpec> plan_;
  PageLayouts layouts_;  // [0] K, [1] V
  std::vector<LayerDest> dests_;
  std::vector<int64_t> block_table_;
  int64_t num_tokens_;
  LoadOptions options_;
  uint64_t max_chunk_bytes_ = 0;
  std::unique_ptr<FileSource> source_;
  std::vector<WorkerScratch> scratch_;  // [threads]
  std::shared_ptr<ChunkSink> sink_;     // null: the job writes host pages itself

  std::atomic<int64_t> next_{0};                     // next plan position to take
  std::atomic<int64_t> first_error_{INT64_MAX};      // lowest failing plan position; later ones are skipped
  std::unique_ptr<std::atomic<int64_t>[]> remaining_;  // [num_layers] chunks left per layer

  mutable std::mutex mutex_;  // guards the fields below; cv_ signals a layer or the job finishing
  std::condition_variable cv_;
  std::vector<char> layer_done_;  // [num_layers]
  int running_ = 0;               // workers not yet finished
  LoadError error_;
  std::vector<std::thread> threads_;
};

}  // namespace kvfast
