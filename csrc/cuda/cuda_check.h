// CUDA error handling shared by the kernels' launchers, the GPU sink and the bindings: every call is checked
// and named, queries leave no stale error behind, and every call that depends on the current device runs under
// a guard that names the device.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

namespace kvfast {
namespace cuda {

inline std::string describe(const char* call, cudaError_t e) {
  return std::string(call) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

inline void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) throw std::runtime_error(std::string("kvfast: CUDA call ") + describe(call, status));
}

// cudaEventQuery / cudaStreamQuery answer "not yet" with cudaErrorNotReady, which the runtime also leaves in the
// calling thread's last-error slot: the next launch on that thread, checked with cudaGetLastError, would report it
// as its own failure. Take it out (as PyTorch does after every query) and hand the answer back.
inline cudaError_t answered(cudaError_t status) {
  if (status == cudaErrorNotReady) cudaGetLastError();
  return status;
}

// Launches report their failure only through the last-error slot, so it must hold nothing older: an error an
// earlier call already returned (and its caller handled) is cleared before the launch. Sticky errors (a kernel
// fault) cannot be cleared and are reported again, as they should be.
inline void clear_last_error() { cudaGetLastError(); }

// Makes `device` the calling thread's current device for the guard's lifetime, then restores the previous one.
// Streams given as 0 (the legacy default stream) and every allocation resolve against the current device, so
// every call from a thread the caller owns runs under one of these. status() says whether it could switch.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) {
      status_ = cudaSetDevice(device);
      restore_ = status_ == cudaSuccess;
    }
    if (status_ != cudaSuccess) clear_last_error();
  }
  ~DeviceGuard() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  cudaError_t status() const { return status_; }
  void check() const { check_cuda(status_, "cudaSetDevice (device guard)"); }

 private:
  int previous_ = 0;
  bool restore_ = false;
  cudaError_t status_ = cudaSuccess;
};

}  // namespace cuda
}  // namespace kvfast
