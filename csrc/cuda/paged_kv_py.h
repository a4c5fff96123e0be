// The Python interface of the paged-cache kernels, shared by kvfast._C_cuda (the CUDA launchers) and
// kvfast._C_cuda_host (the same kernels emulated on the CPU): one argument list, one conversion to
// ScatterArgs / GatherArgs, so the Python wrappers (kernels/_cuda_launch.py) drive either without a difference.
//
// Pointers, the device index and the stream handle arrive as Python ints (tensor.data_ptr(), torch.cuda.Stream
// .cuda_stream), strides in elements. Each function returns the copy word it chose, in bytes (0: nothing to copy).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>

#include "paged_kv_kernels.h"

namespace kvfast {
namespace cuda {

// scatter(const ScatterArgs&, int device, uintptr_t stream) -> int64_t and gather(const GatherArgs&, int device,
// uintptr_t stream) -> int64_t run with the GIL released (a launch can block when the stream's queue is full).
template <class Scatter, class Gather>
void def_paged_kv(pybind11::module_& m, Scatter scatter, Gather gather) {
  namespace py = pybind11;
  m.def(
      "scatter_kv",
      [scatter](uintptr_t src_k, uintptr_t src_v, uintptr_t k_cache, uintptr_t v_cache, uintptr_t slot_mapping,
                int64_t num_layers, int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size,
                int64_t elem_size, std::array<int64_t, 3> src_k_strides, std::array<int64_t, 3> src_v_strides,
                std::array<int64_t, 4> k_cache_strides, std::array<int64_t, 4> v_cache_strides, int device,
                uintptr_t stream) {
        ScatterArgs a{};
        a.src_k = reinterpret_cast<const void*>(src_k);
        a.src_v = reinterpret_cast<const void*>(src_v);
        a.k_cache = reinterpret_cast<void*>(k_cache);
        a.v_cache = reinterpret_cast<void*>(v_cache);
        a.slot_mapping = reinterpret_cast<const int64_t*>(slot_mapping);
        a.num_layers = num_layers;
        a.num_tokens = num_tokens;
        a.num_heads = num_heads;
        a.head_dim = head_dim;
        a.block_size = block_size;
        a.elem_size = elem_size;
        a.src_k_strides = {src_k_strides[0], src_k_strides[1], src_k_strides[2]};
        a.src_v_strides = {src_v_strides[0], src_v_strides[1], src_v_strides[2]};
        a.k_cache_strides = {k_cache_strides[0], k_cache_strides[1], k_cache_strides[2], k_cache_strides[3]};
        a.v_cache_strides = {v_cache_strides[0], v_cache_strides[1], v_cache_strides[2], v_cache_strides[3]};
        py::gil_scoped_release release;
        return scatter(a, device, stream);
      },
      py::arg("src_k"), py::arg("src_v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
      py::arg("num_layers"), py::arg("num_tokens"), py::arg("num_heads"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("elem_size"), py::arg("src_k_strides"), py::arg("src_v_strides"), py::arg("k_cache_strides"),
      py::arg("v_cache_strides"), py::arg("device"), py::arg("stream"),
      "Scatter num_layers x num_tokens rows into paged caches in one launch; returns the copy word in bytes.");
  m.def(
      "gather_kv",
      [gather](uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_table, uintptr_t out_k, uintptr_t out_v,
               int64_t num_tokens, int64_t num_heads, int64_t head_dim, int64_t block_size, int64_t elem_size,
               std::array<int64_t, 3> k_cache_strides, std::array<int64_t, 3> v_cache_strides,
               std::array<int64_t, 2> out_strides, int device, uintptr_t stream) {
        GatherArgs a{};
        a.k_cache = reinterpret_cast<const void*>(k_cache);
        a.v_cache = reinterpret_cast<const void*>(v_cache);
        a.block_table = reinterpret_cast<const int64_t*>(block_table);
        a.out_k = reinterpret_cast<void*>(out_k);
        a.out_v = reinterpret_cast<void*>(out_v);
        a.num_tokens = num_tokens;
        a.num_heads = num_heads;
        a.head_dim = head_dim;
        a.block_size = block_size;
        a.elem_size = elem_size;
        a.k_cache_strides = {k_cache_strides[0], k_cache_strides[1], k_cache_strides[2]};
        a.v_cache_strides = {v_cache_strides[0], v_cache_strides[1], v_cache_strides[2]};
        a.out_token_stride = out_strides[0];
        a.out_head_stride = out_strides[1];
        py::gil_scoped_release release;
        return gather(a, device, stream);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("block_table"), py::arg("out_k"), py::arg("out_v"),
      py::arg("num_tokens"), py::arg("num_heads"), py::arg("head_dim"), py::arg("block_size"), py::arg("elem_size"),
      py::arg("k_cache_strides"), py::arg("v_cache_strides"), py::arg("out_strides"), py::arg("device"),
      py::arg("stream"),
      "Gather a sequence's first num_tokens tokens out of its pages in one launch; returns the copy word in bytes.");
}

}  // namespace cuda
}  // namespace kvfast
