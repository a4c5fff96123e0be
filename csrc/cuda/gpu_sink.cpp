// The GPU ChunkSink: see gpu_sink.h for the pipeline.
#include "gpu_sink.h"

#include <algorithm>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

#include "paged_kv.h"

namespace kvfast {
namespace cuda {

namespace {

std::string describe(const char* call, cudaError_t e) {
  return std::string(call) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

Status device_error(const char* call, cudaError_t e) { return {ErrorKind::kDevice, 0, 0, describe(call, e)}; }

#define KVF_STATUS(call)                                           \
  do {                                                             \
    cudaError_t e_ = (call);                                       \
    if (e_ != cudaSuccess) return device_error(#call, e_);         \
  } while (0)

#define KVF_THROW(call)                                                      \
  do {                                                                       \
    cudaError_t e_ = (call);                                                 \
    if (e_ != cudaSuccess) throw std::runtime_error(describe(#call, e_));    \
  } while (0)

// Runs fn on a fresh thread whose current device is `device`: set-up and tear-down never change the calling
// thread's current device, and so never create a context on a device the caller did not name.
template <class Fn>
void on_device(int device, Fn fn) {
  std::exception_ptr failed;
  std::thread t([&] {
    try {
      KVF_THROW(cudaSetDevice(device));
      fn();
    } catch (...) {
      failed = std::current_exception();
    }
  });
  t.join();
  if (failed) std::rethrow_exception(failed);
}

}  // namespace

GpuSink::GpuSink(PagedLayout layout, std::vector<LayerDest> dests, const std::vector<int64_t>& block_table,
                 int64_t num_tokens, int workers, uint64_t max_chunk_bytes, GpuSinkOptions options)
    : layout_(layout),
      dests_(std::move(dests)),
      block_table_(block_table),
      num_tokens_(num_tokens),
      options_(options),
      slot_bytes_((max_chunk_bytes + 4095) / 4096 * 4096),
      workers_(static_cast<size_t>(std::max(1, workers))) {
  if (options_.dma && !layout_.rows_contiguous())
    throw std::invalid_argument("method 'dma' needs pages whose token rows are contiguous (NHD)");
  if (options_.ring_slots < 2) throw std::invalid_argument("ring_slots must be >= 2");
  layer_events_.assign(dests_.size(), nullptr);
  try {
    on_device(options_.device, [&] {
      KVF_THROW(cudaStreamCreateWithFlags(&join_, cudaStreamNonBlocking));
      for (cudaEvent_t& e : layer_events_) KVF_THROW(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      for (Worker& w : workers_) {
        KVF_THROW(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking));
        KVF_THROW(cudaEventCreateWithFlags(&w.last, cudaEventDisableTiming));
        w.slots.resize(static_cast<size_t>(options_.ring_slots));
        for (Slot& s : w.slots) {
          KVF_THROW(cudaHostAlloc(reinterpret_cast<void**>(&s.host), slot_bytes_, cudaHostAllocDefault));
          if (!options_.dma) KVF_THROW(cudaMalloc(reinterpret_cast<void**>(&s.device), slot_bytes_));
          KVF_THROW(cudaEventCreateWithFlags(&s.free, cudaEventDisableTiming));
        }
      }
      if (!options_.dma) {  // the slot of every token, once: the scatter kernel reads its chunk's range
        std::vector<int64_t> slots(static_cast<size_t>(num_tokens_));
        for (int64_t t = 0; t < num_tokens_; ++t)
          slots[t] = block_table_[t / layout_.block_size] * layout_.block_size + t % layout_.block_size;
        KVF_THROW(cudaMalloc(reinterpret_cast<void**>(&slots_device_), slots.size() * sizeof(int64_t)));
        KVF_THROW(cudaMemcpy(slots_device_, slots.data(), slots.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
      }
    });
  } catch (...) {
    release();
    throw;
  }
}

GpuSink::~GpuSink() { release(); }

// Waits for all enqueued work (the slots may still be read by a copy), then frees. Errors here have nowhere to
// go: a failed stream already reported itself through the job.
void GpuSink::release() {
  try {
    on_device(options_.device, [&] {
      for (Worker& w : workers_) {
        if (w.stream) cudaStreamSynchronize(w.stream);
        for (Slot& s : w.slots) {
          if (s.host) cudaFreeHost(s.host);
          if (s.device) cudaFree(s.device);
          if (s.free) cudaEventDestroy(s.free);
          s = Slot{};
        }
        if (w.last) cudaEventDestroy(w.last);
        if (w.stream) cudaStreamDestroy(w.stream);
        w.last = nullptr;
        w.stream = nullptr;
      }
      if (join_) cudaStreamSynchronize(join_);
      for (cudaEvent_t& e : layer_events_) {
        if (e) cudaEventDestroy(e);
        e = nullptr;
      }
      if (join_) cudaStreamDestroy(join_);
      join_ = nullptr;
      if (slots_device_) cudaFree(slots_device_);
      slots_device_ = nullptr;
    });
  } catch (...) {  // cudaSetDevice itself failed: the driver is gone, and so is what we held
  }
}

Status GpuSink::use_device(Worker& w) {
  if (!w.device_set) {  // the job's worker threads are this load's own: setting their device is ours to do
    KVF_STATUS(cudaSetDevice(options_.device));
    w.device_set = true;
  }
  return {};
}

Status GpuSink::load(const ChunkSpec& c, int worker, FileSource& source, SourceScratch* scratch) {
  Worker& w = workers_[static_cast<size_t>(worker)];
  Status s = use_device(w);
  if (!s.ok()) return s;
  Slot& slot = w.slots[static_cast<size_t>(w.next)];
  w.next = (w.next + 1) % options_.ring_slots;
  if (slot.used) KVF_STATUS(cudaEventSynchronize(slot.free));  // the copy that last read this slot is done

  uint32_t crc = 0;
  for (uint64_t done = 0; done < c.length;) {  // pieces of piece_bytes: each is checksummed while in L2
    const uint64_t n = std::min<uint64_t>(options_.piece_bytes, c.length - done);
    const iovec piece = {slot.host + done, n};
    s = source.read(c.offset + done, &piece, 1, n, scratch, options_.verify ? &crc : nullptr, false);
    if (!s.ok()) return s;
    done += n;
  }
  if (options_.verify && crc != c.crc32c) return {ErrorKind::kChecksum, 0, c.offset, "checksum mismatch"};

  s = options_.dma ? enqueue_dma(c, w, slot) : enqueue_scatter(c, w, slot);
  if (!s.ok()) return s;
  slot.used = true;
  KVF_STATUS(cudaEventRecord(slot.free, w.stream));
  std::lock_guard<std::mutex> lock(mutex_);
  KVF_STATUS(cudaEventRecord(w.last, w.stream));
  return {};
}

// One host->device copy of the whole chunk, then the stride-addressed scatter of its stored tokens.
Status GpuSink::enqueue_scatter(const ChunkSpec& c, Worker& w, Slot& slot) {
  KVF_STATUS(cudaMemcpyAsync(slot.device, slot.host, c.length, cudaMemcpyHostToDevice, w.stream));
  const int64_t tokens = c.stop - c.start;
  const int64_t stored = std::min(c.stop, num_tokens_) - c.start;  // a prefix load's last chunk: fewer
  const int64_t e = options_.elem_size;
  const int64_t head_dim = layout_.head_bytes / e;
  ScatterArgs a{};
  a.src_k = slot.device;
  a.src_v = slot.device + tokens * layout_.row_bytes();
  a.k_cache = dests_[c.layer].pages[0];
  a.v_cache = dests_[c.layer].pages[1];
  a.slot_mapping = slots_device_ + c.start;
  a.num_layers = 1;
  a.num_tokens = stored;
  a.num_heads = layout_.num_heads;
  a.head_dim = head_dim;
  a.block_size = layout_.block_size;
  a.elem_size = e;
  a.src_k_strides = {0, layout_.num_heads * head_dim, head_dim};
  a.src_v_strides = a.src_k_strides;
  a.k_cache_strides = {0, layout_.block_stride / e, layout_.token_stride / e, layout_.head_stride / e};
  a.v_cache_strides = a.k_cache_strides;
  try {
    scatter_kv(a, w.stream);
  } catch (const std::exception& ex) {
    return {ErrorKind::kDevice, 0, c.offset, ex.what()};
  }
  return {};
}

// Copy engines straight from pinned staging into the pages: one copy per run of tokens inside a block.
Status GpuSink::enqueue_dma(const ChunkSpec& c, Worker& w, const Slot& slot) {
  const int64_t bs = layout_.block_size;
  const int64_t row = layout_.row_bytes();
  const int64_t tokens = c.stop - c.start;
  const int64_t end = std::min(c.stop, num_tokens_);
  w.dsts.clear();
  w.srcs.clear();
  w.sizes.clear();
  for (int kv = 0; kv < 2; ++kv) {
    const uint8_t* src = slot.host + kv * tokens * row;
    for (int64_t t = c.start; t < end;) {
      const int64_t run = std::min(bs - t % bs, end - t);
      w.dsts.push_back(dests_[c.layer].pages[kv] + block_table_[t / bs] * layout_.block_stride +
                       (t % bs) * layout_.token_stride);
      w.srcs.push_back(src + (t - c.start) * row);
      w.sizes.push_back(static_cast<size_t>(run * row));
      t += run;
    }
  }
#if CUDART_VERSION >= 12080
  if (batch_copies_.load(std::memory_order_relaxed)) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the slot is ours until its event: stream order
    size_t first = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t e = cudaMemcpyBatchAsync(w.dsts.data(), w.srcs.data(), w.sizes.data(), w.sizes.size(), &attr,
                                               &first, 1, w.stream);
#else
    size_t failed_at = 0;
    const cudaError_t e = cudaMemcpyBatchAsync(const_cast<void**>(w.dsts.data()), const_cast<void**>(w.srcs.data()),
                                               w.sizes.data(), w.sizes.size(), &attr, &first, 1, &failed_at, w.stream);
#endif
    if (e == cudaSuccess) return {};
    if (e != cudaErrorNotSupported && e != cudaErrorCallRequiresNewerDriver)
      return device_error("cudaMemcpyBatchAsync", e);
    cudaGetLastError();  // an older driver: clear it and copy run by run from now on
    batch_copies_.store(false, std::memory_order_relaxed);
  }
#endif
  for (size_t i = 0; i < w.sizes.size(); ++i)
    KVF_STATUS(cudaMemcpyAsync(w.dsts[i], w.srcs[i], w.sizes[i], cudaMemcpyHostToDevice, w.stream));
  return {};
}

Status GpuSink::layer_complete(int64_t layer) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Worker& w : workers_) KVF_STATUS(cudaStreamWaitEvent(join_, w.last, 0));
  KVF_STATUS(cudaEventRecord(layer_events_[static_cast<size_t>(layer)], join_));
  return {};
}

bool GpuSink::layer_landed(int64_t layer) {
  return cudaEventQuery(layer_events_[static_cast<size_t>(layer)]) == cudaSuccess;
}

Status GpuSink::synchronize_layer(int64_t layer) {
  KVF_STATUS(cudaEventSynchronize(layer_events_[static_cast<size_t>(layer)]));
  return {};
}

Status GpuSink::stream_wait_layer(int64_t layer, cudaStream_t stream) {
  KVF_STATUS(cudaStreamWaitEvent(stream, layer_events_[static_cast<size_t>(layer)], 0));
  return {};
}

Status GpuSink::synchronize() {
  for (Worker& w : workers_) KVF_STATUS(cudaStreamSynchronize(w.stream));
  KVF_STATUS(cudaStreamSynchronize(join_));
  return {};
}

}  // namespace cuda
}  // namespace kvfast
