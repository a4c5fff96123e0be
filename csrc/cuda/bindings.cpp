// kvfast._C_cuda: declarations and exports only; the kernels and launchers live in paged_kv.cu.
//
// Pointers and the stream arrive as Python ints (tensor.data_ptr(), torch.cuda.Stream.cuda_stream), so this
// module links against the CUDA runtime alone, never against libtorch: it builds without torch headers and
// works with whichever torch the GPU machine has. The torch-tensor wrappers are kvfast/kernels/cuda.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "paged_kv.h"

namespace py = pybind11;
namespace kc = kvfast::cuda;

namespace {

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void py_scatter_kv(uintptr_t src_k, uintptr_t src_v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slot_mapping,
                   int64_t num_layers, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size,
                   int64_t elem_size, std::array<int64_t, 3> src_k_strides, std::array<int64_t, 3> src_v_strides,
                   std::array<int64_t, 4> k_cache_strides, std::array<int64_t, 4> v_cache_strides, uintptr_t stream) {
  kc::ScatterArgs args{};
  args.src_k = as_ptr<const void>(src_k);
  args.src_v = as_ptr<const void>(src_v);
  args.k_cache = as_ptr<void>(k_cache);
  args.v_cache = as_ptr<void>(v_cache);
  args.slot_mapping = as_ptr<const int64_t>(slot_mapping);
  args.num_layers = num_layers;
  args.num_tokens = num_tokens;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.block_size = block_size;
  args.elem_size = elem_size;
  args.src_k_strides = {src_k_strides[0], src_k_strides[1], src_k_strides[2]};
  args.src_v_strides = {src_v_strides[0], src_v_strides[1], src_v_strides[2]};
  args.k_cache_strides = {k_cache_strides[0], k_cache_strides[1], k_cache_strides[2], k_cache_strides[3]};
  args.v_cache_strides = {v_cache_strides[0], v_cache_strides[1], v_cache_strides[2], v_cache_strides[3]};
  py::gil_scoped_release release;  // a launch can block when the stream's queue is full
  kc::scatter_kv(args, as_stream(stream));
}

void py_gather_kv(uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_table, uintptr_t out_k, uintptr_t out_v,
                  int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t elem_size,
                  std::array<int64_t, 3> k_cache_strides, std::array<int64_t, 3> v_cache_strides,
                  std::array<int64_t, 2> out_strides, uintptr_t stream) {
  kc::GatherArgs args{};
  args.k_cache = as_ptr<const void>(k_cache);
  args.v_cache = as_ptr<const void>(v_cache);
  args.block_table = as_ptr<const int64_t>(block_table);
  args.out_k = as_ptr<void>(out_k);
  args.out_v = as_ptr<void>(out_v);
  args.num_tokens = num_tokens;
  args.num_heads = num_heads;
  args.head_dim = head_dim;
  args.block_size = block_size;
  args.elem_size = elem_size;
  args.k_cache_strides = {k_cache_strides[0], k_cache_strides[1], k_cache_strides[2]};
  args.v_cache_strides = {v_cache_strides[0], v_cache_strides[1], v_cache_strides[2]};
  args.out_token_stride = out_strides[0];
  args.out_head_stride = out_strides[1];
  py::gil_scoped_release release;
  kc::gather_kv(args, as_stream(stream));
}

int device_count() {
  int count = 0;
  // No driver or no device is an answer here, not an error: 0.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it, so the next launch does not report it as its own
    return 0;
  }
  return count;
}

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);  // needs no driver: it reports the runtime linked into this module
  return version;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kvfast CUDA paged-cache kernels over raw device pointers (see kvfast/_C_cuda.pyi)";
  m.def("scatter_kv", &py_scatter_kv, py::arg("src_k"), py::arg("src_v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("num_layers"), py::arg("num_tokens"), py::arg("num_heads"),
        py::arg("head_dim"), py::arg("block_size"), py::arg("elem_size"), py::arg("src_k_strides"),
        py::arg("src_v_strides"), py::arg("k_cache_strides"), py::arg("v_cache_strides"), py::arg("stream"),
        "Scatter num_layers x num_tokens rows into paged caches (one launch, asynchronous on `stream`).");
  m.def("gather_kv", &py_gather_kv, py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"),
        py::arg("out_k"), py::arg("out_v"), py::arg("num_tokens"), py::arg("num_heads"), py::arg("head_dim"),
        py::arg("block_size"), py::arg("elem_size"), py::arg("k_cache_strides"), py::arg("v_cache_strides"),
        py::arg("out_strides"), py::arg("stream"),
        "Gather a sequence's first num_tokens tokens out of its pages (one launch, asynchronous on `stream`).");
  m.def("device_count", &device_count, "CUDA devices this module's runtime sees (0 without a driver or GPU).");
  m.def("runtime_version", &runtime_version, "The CUDA runtime version linked in, e.g. 13000 for 13.0.");
}
