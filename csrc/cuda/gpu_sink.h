// File -> pinned staging -> GPU paged cache: the ChunkSink (paged_loader.h) that gives kvfast's LoadJob a
// destination in device memory. The job's workers, plan, checksums and failure handling are the host loader's;
// this sink adds, per worker, a small ring of pinned staging slots and a CUDA stream.
//
//   set-up:             the join stream waits for the caller's stream (work already queued on these blocks:
//                       zeroing, copy on write, kernels still reading them runs first), uploads the token -> slot
//                       table from pinned memory, records `ready`; every worker stream waits for `ready`
//   worker w, chunk c:  wait for ring slot s to be free (its event)  ->  read c into pinned slot s, CRC-32C on
//   the way, piece by piece while each piece is in L2  ->  checksum mismatch? fail before one byte leaves the host
//   ->  enqueue on stream w:  scatter   cudaMemcpyAsync(slot -> device staging), scatter_kv kernel into the pages
//                             dma       the copy engines straight into the pages, a run of tokens inside a block per
//                                       copy (NHD only: a run's rows must be contiguous in the page), the chunk's
//                                       runs as one cudaMemcpyBatchAsync where runtime and driver have it
//                                       (CUDA 12.8+), else one cudaMemcpyAsync per run
//   -> record slot s's event.                (the arguments of both enqueues: sink_plan.h, tested on the CPU)
//
// Layers: the job calls layer_complete(l) once every chunk of l was enqueued. Each worker's stream runs its
// chunks in order, so a join stream that waits on every worker's latest event has all of layer l behind it;
// the layer's event is recorded there. A caller's stream can wait on it (stream_wait_layer), so layer l's
// attention starts while later layers are still in flight; nothing here waits for the whole device.
//
// Memory: staging slots (pinned, plus device staging for scatter) and the slot table come from the device's
// StagingPool (staging_pool.h) and go back to it once the sink's streams are done (recycle() or the destructor),
// so a load neither allocates nor frees device memory in steady state. Every CUDA call runs on the device the
// caller named: worker threads set it once, the caller's threads under a DeviceGuard, set-up and tear-down on a
// thread of their own. Every failure names the CUDA call.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "paged_loader.h"
#include "sink_plan.h"
#include "staging_pool.h"

namespace kvfast {
namespace cuda {

struct GpuSinkOptions {
  int device = 0;
  bool dma = false;          // false: staging copy + scatter kernel
  bool verify = true;
  uint64_t piece_bytes = 256 << 10;
  int ring_slots = 3;        // per worker: one being read, one in flight, one spare
  int64_t elem_size = 2;     // bytes per KV element (the scatter kernel's unit)
  cudaStream_t after = nullptr;  // the caller's stream on `device` (0: its legacy default stream): the load's
                                 // writes start after the work queued there when the sink is made
};

class GpuSink : public ChunkSink {
 public:
  // layout: byte strides of each layer's device pages; dests[l].pages: device pointers of layer l's K and V.
  // Throws std::runtime_error naming the CUDA call that failed, std::invalid_argument for bad options.
  GpuSink(PagedLayout layout, std::vector<LayerDest> dests, const std::vector<int64_t>& block_table,
          int64_t num_tokens, int workers, uint64_t max_chunk_bytes, GpuSinkOptions options);
  ~GpuSink() override;  // waits for its own streams, returns its buffers to the pool
  GpuSink(const GpuSink&) = delete;
  GpuSink& operator=(const GpuSink&) = delete;

  Status load(const ChunkSpec& c, int worker, FileSource& source, SourceScratch* scratch) override;
  Status layer_complete(int64_t layer) override;

  // From the caller's threads, only after the job reported the layer done (its event is recorded by then).
  Status layer_landed(int64_t layer, bool* landed);              // cudaEventQuery
  Status synchronize_layer(int64_t layer);                       // host waits
  Status stream_wait_layer(int64_t layer, cudaStream_t stream);  // `stream` (on the sink's device) waits
  // From the caller's threads, only after the job's workers stopped.
  Status landed(bool* all);  // whether every stream of this sink is idle (cudaStreamQuery)
  Status synchronize();      // host waits for every stream of this sink
  void recycle();            // after synchronize() succeeded: staging buffers back to the pool

 private:
  struct Slot {
    StagingBuffer buffer;        // host: pinned, >= slot_bytes_; device: scatter only
    cudaEvent_t free = nullptr;  // recorded after the slot's last use on its stream
    bool used = false;
  };
  struct Worker {
    cudaStream_t stream = nullptr;
    cudaEvent_t last = nullptr;  // recorded after each chunk it enqueued
    std::vector<Slot> slots;
    int next = 0;
    bool device_set = false;
    CopyRuns runs;  // dma: one chunk's runs, for one batched copy
  };

  void set_up();
  Status enqueue_scatter(const ChunkSpec& c, Worker& w, Slot& slot);
  Status enqueue_dma(const ChunkSpec& c, Worker& w, const Slot& slot);
  std::atomic<bool> batch_copies_{true};  // cleared when the driver refuses cudaMemcpyBatchAsync
  Status use_device(Worker& w);
  void return_buffers();  // with the device current; every stream idle
  void release();

  PagedLayout layout_;
  std::vector<LayerDest> dests_;
  std::vector<int64_t> block_table_;
  int64_t num_tokens_;
  GpuSinkOptions options_;
  uint64_t slot_bytes_;
  StagingBuffer slot_table_;  // scatter: [num_tokens] int64 slot of each token, pinned and on the device
  std::vector<Worker> workers_;
  cudaStream_t join_ = nullptr;
  cudaEvent_t after_ = nullptr;  // on options_.after: the caller's work queued before the load
  cudaEvent_t ready_ = nullptr;  // on join_: after_, then the slot table's upload
  std::vector<cudaEvent_t> layer_events_;
  std::mutex mutex_;          // orders event records against the join's waits
  std::mutex buffers_mutex_;  // guards returning the buffers (recycle() and the destructor)
};

}  // namespace cuda
}  // namespace kvfast
