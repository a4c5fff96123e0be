// File -> pinned staging -> GPU paged cache: the ChunkSink (paged_loader.h) that gives kvfast's LoadJob a
// destination in device memory. The job's workers, plan, checksums and failure handling are the host loader's;
// this sink adds, per worker, a small ring of pinned staging slots and a CUDA stream.
//
//   worker w, chunk c:  wait for ring slot s to be free (its event)  ->  read c into pinned slot s, CRC-32C on
//   the way, piece by piece while each piece is in L2  ->  checksum mismatch? fail before one byte leaves the host
//   ->  enqueue on stream w:  scatter   cudaMemcpyAsync(slot -> device staging), scatter_kv kernel into the pages
//                             dma       the copy engines straight into the pages, a run of tokens inside a block per
//                                       copy (NHD only: a run's rows must be contiguous in the page), the chunk's
//                                       runs as one cudaMemcpyBatchAsync where runtime and driver have it
//                                       (CUDA 12.8+), else one cudaMemcpyAsync per run
//   -> record slot s's event.
//
// Layers: the job calls layer_complete(l) once every chunk of l was enqueued. Each worker's stream runs its
// chunks in order, so a join stream that waits on every worker's latest event has all of layer l behind it;
// the layer's event is recorded there. A caller's stream can wait on it (stream_wait_layer), so layer l's
// attention starts while later layers are still in flight; nothing here calls cudaDeviceSynchronize.
//
// Bounded by design: pinned memory is threads x ring_slots x the largest chunk (a few MB), allocated once per
// load; every CUDA call runs on the device the caller named (set per thread, the caller's current device is
// restored), and every failure names the CUDA call.
#pragma once
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

#include "paged_loader.h"

namespace kvfast {
namespace cuda {

struct GpuSinkOptions {
  int device = 0;
  bool dma = false;          // false: staging copy + scatter kernel
  bool verify = true;
  uint64_t piece_bytes = 256 << 10;
  int ring_slots = 3;        // per worker: one being read, one in flight, one spare
  int64_t elem_size = 2;     // bytes per KV element (the scatter kernel's unit)
};

class GpuSink : public ChunkSink {
 public:
  // layout: byte strides of each layer's device pages; dests[l].pages: device pointers of layer l's K and V.
  // Throws std::runtime_error naming the CUDA call that failed.
  GpuSink(PagedLayout layout, std::vector<LayerDest> dests, const std::vector<int64_t>& block_table,
          int64_t num_tokens, int workers, uint64_t max_chunk_bytes, GpuSinkOptions options);
  ~GpuSink() override;  // waits for everything it enqueued, then frees
  GpuSink(const GpuSink&) = delete;
  GpuSink& operator=(const GpuSink&) = delete;

  Status load(const ChunkSpec& c, int worker, FileSource& source, SourceScratch* scratch) override;
  Status layer_complete(int64_t layer) override;

  // Only after the job reported the layer done (its event is recorded by then).
  bool layer_landed(int64_t layer);                             // cudaEventQuery
  Status synchronize_layer(int64_t layer);                      // host waits
  Status stream_wait_layer(int64_t layer, cudaStream_t stream);  // `stream` waits, the host does not
  Status synchronize();                                         // every stream of this sink

 private:
  struct Slot {
    uint8_t* host = nullptr;    // pinned, max_chunk_bytes
    uint8_t* device = nullptr;  // scatter only: the chunk's device staging
    cudaEvent_t free = nullptr;  // recorded after the slot's last use on its stream
    bool used = false;
  };
  struct Worker {
    cudaStream_t stream = nullptr;
    cudaEvent_t last = nullptr;  // recorded after each chunk it enqueued
    std::vector<Slot> slots;
    int next = 0;
    bool device_set = false;
    std::vector<void*> dsts;  // dma: one chunk's runs, for one batched copy
    std::vector<const void*> srcs;
    std::vector<size_t> sizes;
  };

  Status enqueue_scatter(const ChunkSpec& c, Worker& w, Slot& slot);
  Status enqueue_dma(const ChunkSpec& c, Worker& w, const Slot& slot);
  std::atomic<bool> batch_copies_{true};  // cleared when the driver refuses cudaMemcpyBatchAsync
  Status use_device(Worker& w);
  void release();

  PagedLayout layout_;
  std::vector<LayerDest> dests_;
  std::vector<int64_t> block_table_;
  int64_t num_tokens_;
  GpuSinkOptions options_;
  uint64_t slot_bytes_;
  int64_t* slots_device_ = nullptr;  // [num_tokens] slot of each token, for the scatter kernel
  std::vector<Worker> workers_;
  cudaStream_t join_ = nullptr;
  std::vector<cudaEvent_t> layer_events_;
  std::mutex mutex_;  // orders event records against the join's waits
};

}  // namespace cuda
}  // namespace kvfast
