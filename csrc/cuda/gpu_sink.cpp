// The GPU ChunkSink: see gpu_sink.h for the pipeline.
#include "gpu_sink.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <thread>

#include "cuda_check.h"
#include "paged_kv.h"

namespace kvfast {
namespace cuda {

namespace {

Status device_error(const char* call, cudaError_t e) {
  clear_last_error();  // reported here: it must not resurface as a later launch's failure
  return {ErrorKind::kDevice, 0, 0, describe(call, e)};
}

#define KVF_STATUS(call)                                           \
  do {                                                             \
    cudaError_t e_ = (call);                                       \
    if (e_ != cudaSuccess) return device_error(#call, e_);         \
  } while (0)

#define KVF_THROW(call)                                                      \
  do {                                                                       \
    cudaError_t e_ = (call);                                                 \
    if (e_ != cudaSuccess) {                                                 \
      clear_last_error();                                                    \
      throw std::runtime_error(describe(#call, e_));                         \
    }                                                                        \
  } while (0)

#define KVF_GUARD(device)                                                    \
  DeviceGuard guard_(device);                                                \
  if (guard_.status() != cudaSuccess) return device_error("cudaSetDevice (device guard)", guard_.status())

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
    on_device(options_.device, [&] { set_up(); });
  } catch (...) {
    release();
    throw;
  }
}

// On the set-up thread, with the device current.
void GpuSink::set_up() {
  StagingPool& pool = StagingPool::of_device(options_.device);
  KVF_THROW(cudaStreamCreateWithFlags(&join_, cudaStreamNonBlocking));
  KVF_THROW(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  for (cudaEvent_t& e : layer_events_) KVF_THROW(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  for (Worker& w : workers_) {
    KVF_THROW(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking));
    KVF_THROW(cudaEventCreateWithFlags(&w.last, cudaEventDisableTiming));
    w.slots.resize(static_cast<size_t>(options_.ring_slots));
    for (Slot& s : w.slots) {
      KVF_THROW(pool.acquire(slot_bytes_, !options_.dma, &s.buffer));
      KVF_THROW(cudaEventCreateWithFlags(&s.free, cudaEventDisableTiming));
    }
  }
  // The caller's stream first: blocks just allocated may still be zeroed, copied (copy on write) or read by
  // kernels queued there, and the load's writes must land after them.
  KVF_THROW(cudaEventCreateWithFlags(&after_, cudaEventDisableTiming));
  KVF_THROW(cudaEventRecord(after_, options_.after));
  KVF_THROW(cudaStreamWaitEvent(join_, after_, 0));
  if (!options_.dma) {  // the slot of every token, once: the scatter kernel reads its chunk's range
    const std::vector<int64_t> slots = token_slots(block_table_, num_tokens_, layout_.block_size);
    const uint64_t bytes = slots.size() * sizeof(int64_t);
    KVF_THROW(pool.acquire(bytes, true, &slot_table_));
    std::memcpy(slot_table_.host, slots.data(), bytes);
    // From pinned memory on a stream: the workers' streams wait for `ready`, so no scatter reads the table early
    // (a pageable cudaMemcpy may return before its copy lands, and non-blocking streams do not wait for it).
    KVF_THROW(cudaMemcpyAsync(slot_table_.device, slot_table_.host, bytes, cudaMemcpyHostToDevice, join_));
  }
  KVF_THROW(cudaEventRecord(ready_, join_));
  for (Worker& w : workers_) KVF_THROW(cudaStreamWaitEvent(w.stream, ready_, 0));
}

GpuSink::~GpuSink() { release(); }

// Waits for this sink's streams only (never the device), returns the buffers, destroys streams and events.
// Errors here have nowhere to go: a failed stream already reported itself through the job.
void GpuSink::release() {
  try {
    on_device(options_.device, [&] {
      for (Worker& w : workers_)
        if (w.stream) cudaStreamSynchronize(w.stream);
      if (join_) cudaStreamSynchronize(join_);
      return_buffers();
      for (Worker& w : workers_) {
        for (Slot& s : w.slots) {
          if (s.free) cudaEventDestroy(s.free);
          s.free = nullptr;
        }
        if (w.last) cudaEventDestroy(w.last);
        if (w.stream) cudaStreamDestroy(w.stream);
        w.last = nullptr;
        w.stream = nullptr;
      }
      for (cudaEvent_t& e : layer_events_) {
        if (e) cudaEventDestroy(e);
        e = nullptr;
      }
      for (cudaEvent_t* e : {&after_, &ready_}) {
        if (*e) cudaEventDestroy(*e);
        *e = nullptr;
      }
      if (join_) cudaStreamDestroy(join_);
      join_ = nullptr;
      clear_last_error();
    });
  } catch (...) {  // cudaSetDevice itself failed: the driver is gone, and so is what we held
  }
}

void GpuSink::return_buffers() {
  std::lock_guard<std::mutex> lock(buffers_mutex_);
  StagingPool& pool = StagingPool::of_device(options_.device);
  for (Worker& w : workers_) {
    for (Slot& s : w.slots) {
      pool.release(s.buffer);
      s.buffer = StagingBuffer{};
    }
  }
  pool.release(slot_table_);
  slot_table_ = StagingBuffer{};
}

void GpuSink::recycle() {
  DeviceGuard guard(options_.device);
  if (guard.status() == cudaSuccess) return_buffers();  // else the destructor tries again on its own thread
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
    const iovec piece = {slot.buffer.host + done, n};
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
  KVF_STATUS(cudaMemcpyAsync(slot.buffer.device, slot.buffer.host, c.length, cudaMemcpyHostToDevice, w.stream));
  const ScatterArgs a = chunk_scatter_args(layout_, c, num_tokens_, options_.elem_size, slot.buffer.device,
                                           dests_[static_cast<size_t>(c.layer)],
                                           reinterpret_cast<const int64_t*>(slot_table_.device));
  try {
    scatter_kv(a, options_.device, w.stream);
  } catch (const std::exception& ex) {
    return {ErrorKind::kDevice, 0, c.offset, ex.what()};
  }
  return {};
}

// Copy engines straight from pinned staging into the pages: one copy per run of tokens inside a block.
Status GpuSink::enqueue_dma(const ChunkSpec& c, Worker& w, const Slot& slot) {
  chunk_dma_runs(layout_, c, num_tokens_, slot.buffer.host, dests_[static_cast<size_t>(c.layer)], block_table_,
                 &w.runs);
  std::vector<void*>& dsts = w.runs.dsts;
  std::vector<const void*>& srcs = w.runs.srcs;
  std::vector<size_t>& sizes = w.runs.sizes;
#if CUDART_VERSION >= 12080
  if (batch_copies_.load(std::memory_order_relaxed)) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // the slot is ours until its event: stream order
    size_t first = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr, &first, 1,
                                               w.stream);
#else
    size_t failed_at = 0;
    const cudaError_t e = cudaMemcpyBatchAsync(const_cast<void**>(dsts.data()), const_cast<void**>(srcs.data()),
                                               sizes.data(), sizes.size(), &attr, &first, 1, &failed_at, w.stream);
#endif
    if (e == cudaSuccess) return {};
    if (e != cudaErrorNotSupported && e != cudaErrorCallRequiresNewerDriver)
      return device_error("cudaMemcpyBatchAsync", e);
    clear_last_error();  // an older driver: copy run by run from now on
    batch_copies_.store(false, std::memory_order_relaxed);
  }
#endif
  for (size_t i = 0; i < sizes.size(); ++i)
    KVF_STATUS(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyHostToDevice, w.stream));
  return {};
}

Status GpuSink::layer_complete(int64_t layer) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (Worker& w : workers_) KVF_STATUS(cudaStreamWaitEvent(join_, w.last, 0));
  KVF_STATUS(cudaEventRecord(layer_events_[static_cast<size_t>(layer)], join_));
  return {};
}

Status GpuSink::layer_landed(int64_t layer, bool* landed) {
  KVF_GUARD(options_.device);
  const cudaError_t e = answered(cudaEventQuery(layer_events_[static_cast<size_t>(layer)]));
  *landed = e == cudaSuccess;
  if (e != cudaSuccess && e != cudaErrorNotReady) return device_error("cudaEventQuery", e);
  return {};
}

Status GpuSink::synchronize_layer(int64_t layer) {
  KVF_GUARD(options_.device);
  KVF_STATUS(cudaEventSynchronize(layer_events_[static_cast<size_t>(layer)]));
  return {};
}

Status GpuSink::stream_wait_layer(int64_t layer, cudaStream_t stream) {
  KVF_GUARD(options_.device);  // a stream of 0 is the legacy default stream of the current device: this one
  KVF_STATUS(cudaStreamWaitEvent(stream, layer_events_[static_cast<size_t>(layer)], 0));
  return {};
}

Status GpuSink::landed(bool* all) {
  KVF_GUARD(options_.device);
  *all = true;
  std::vector<cudaStream_t> streams = {join_};
  for (Worker& w : workers_) streams.push_back(w.stream);
  for (cudaStream_t s : streams) {
    const cudaError_t e = answered(cudaStreamQuery(s));
    if (e == cudaErrorNotReady) {
      *all = false;
      return {};
    }
    if (e != cudaSuccess) return device_error("cudaStreamQuery", e);
  }
  return {};
}

Status GpuSink::synchronize() {
  KVF_GUARD(options_.device);
  for (Worker& w : workers_) KVF_STATUS(cudaStreamSynchronize(w.stream));
  KVF_STATUS(cudaStreamSynchronize(join_));
  return {};
}

}  // namespace cuda
}  // namespace kvfast
