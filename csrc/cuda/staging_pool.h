// Pinned host staging and device buffers, kept per device and reused across loads.
//
// Why a pool: cudaHostAlloc and cudaMalloc are slow, and cudaFree and cudaFreeHost wait for all work on the
// device: a load that allocated and freed its own buffers would block behind whatever else runs (a prefill on
// another stream), which is exactly what a load next to a serving engine must not do. So buffers are allocated
// once, in power-of-two size classes, handed to one load at a time and returned when its streams are done with
// them; the pool only grows to what concurrent loads need at once (threads x ring slots each), and past
// kMaxCachedBytes a returned buffer is freed instead of kept.
//
// Pools live as long as the process: they are never destroyed, since freeing at exit could run after the
// CUDA runtime's own teardown.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

namespace kvfast {
namespace cuda {

struct StagingBuffer {
  uint8_t* host = nullptr;    // pinned, `bytes` long
  uint8_t* device = nullptr;  // `bytes` long on the pool's device, or null when not asked for
  uint64_t bytes = 0;         // the size class: a power of two >= kMinBytes
};

struct StagingPoolStats {
  uint64_t allocations = 0;     // buffers ever allocated (host and device halves count as one)
  uint64_t cached_buffers = 0;  // idle, ready for the next load
  uint64_t cached_bytes = 0;    // of the idle buffers, host and device halves both counted
  uint64_t in_use = 0;          // handed out and not yet returned
};

class StagingPool {
 public:
  static constexpr uint64_t kMinBytes = 64 << 10;
  static constexpr uint64_t kMaxCachedBytes = uint64_t{4} << 30;

  // The pool of `device` (created on first use, never destroyed).
  static StagingPool& of_device(int device);

  // A buffer of at least `bytes` (with a device half when with_device), reused or allocated. The pool's device
  // must be current. Returns the failing CUDA call's error, with *out untouched.
  cudaError_t acquire(uint64_t bytes, bool with_device, StagingBuffer* out);
  // Returns a buffer; nothing enqueued may still use it. The pool's device must be current.
  void release(StagingBuffer buffer);
  // Frees every idle buffer (this does wait for the device). The pool's device must be current.
  void trim();
  StagingPoolStats stats() const;

 private:
  StagingPool() = default;
  static void free_buffer(const StagingBuffer& b);

  mutable std::mutex mutex_;
  std::map<std::pair<uint64_t, bool>, std::vector<StagingBuffer>> idle_;  // (bytes, with device half) -> buffers
  StagingPoolStats stats_;
};

}  // namespace cuda
}  // namespace kvfast
