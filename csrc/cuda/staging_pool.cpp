// The per-device staging pool (staging_pool.h).
#include "staging_pool.h"

#include "cuda_check.h"

namespace kvfast {
namespace cuda {

namespace {
uint64_t size_class(uint64_t bytes) {
  uint64_t c = StagingPool::kMinBytes;
  while (c < bytes) c <<= 1;
  return c;
}
uint64_t footprint(const StagingBuffer& b) { return b.device ? 2 * b.bytes : b.bytes; }
}  // namespace

StagingPool& StagingPool::of_device(int device) {
  static std::mutex mutex;
  static auto* pools = new std::map<int, StagingPool*>();  // leaked on purpose: see the header
  std::lock_guard<std::mutex> lock(mutex);
  StagingPool*& pool = (*pools)[device];
  if (!pool) pool = new StagingPool();
  return *pool;
}

cudaError_t StagingPool::acquire(uint64_t bytes, bool with_device, StagingBuffer* out) {
  const uint64_t size = size_class(bytes);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<StagingBuffer>& idle = idle_[{size, with_device}];
    if (!idle.empty()) {
      *out = idle.back();
      idle.pop_back();
      stats_.cached_buffers -= 1;
      stats_.cached_bytes -= footprint(*out);
      stats_.in_use += 1;
      return cudaSuccess;
    }
  }
  StagingBuffer b;
  b.bytes = size;
  cudaError_t e = cudaHostAlloc(reinterpret_cast<void**>(&b.host), size, cudaHostAllocDefault);
  if (e == cudaSuccess && with_device) {
    e = cudaMalloc(reinterpret_cast<void**>(&b.device), size);
    if (e != cudaSuccess) cudaFreeHost(b.host);
  }
  if (e != cudaSuccess) {
    clear_last_error();
    return e;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.allocations += 1;
  stats_.in_use += 1;
  *out = b;
  return cudaSuccess;
}

void StagingPool::release(StagingBuffer buffer) {
  if (!buffer.host) return;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.in_use -= 1;
    if (stats_.cached_bytes + footprint(buffer) <= kMaxCachedBytes) {
      idle_[{buffer.bytes, buffer.device != nullptr}].push_back(buffer);
      stats_.cached_buffers += 1;
      stats_.cached_bytes += footprint(buffer);
      return;
    }
  }
  free_buffer(buffer);
}

void StagingPool::trim() {
  std::map<std::pair<uint64_t, bool>, std::vector<StagingBuffer>> idle;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    idle.swap(idle_);
    stats_.cached_buffers = 0;
    stats_.cached_bytes = 0;
  }
  for (auto& entry : idle)
    for (const StagingBuffer& b : entry.second) free_buffer(b);
}

StagingPoolStats StagingPool::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

void StagingPool::free_buffer(const StagingBuffer& b) {
  // Errors have nowhere to go: a buffer that cannot be freed is lost either way.
  cudaFreeHost(b.host);
  if (b.device) cudaFree(b.device);
  clear_last_error();
}

}  // namespace cuda
}  // namespace kvfast
