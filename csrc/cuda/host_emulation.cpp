// kvfast._C_cuda_host: the CUDA paged-cache kernels and the GPU sink's per-chunk arithmetic, compiled for the
// CPU, so CI tests them without a GPU.
//
// The kernels' bodies, their launch planning (checks, copy word, strides in words) and the sink's arguments
// (sink_plan.h) are the very code nvcc compiles into kvfast._C_cuda; only the launch differs: instead of
// <<<grid, threads>>>, a loop runs every CTA of the grid and, inside it, every thread of the CTA in turn, each
// with its own blockIdx / threadIdx. The copies' threads never write what another reads, so running them in
// turn computes what the GPU computes. Pointers are host addresses (CPU tensors); `device` and `stream` are
// accepted for the same signature as kvfast._C_cuda and ignored.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "load_plan.h"
#include "paged_kv_kernels.h"
#include "paged_kv_py.h"
#include "sink_plan.h"

namespace py = pybind11;
namespace kc = kvfast::cuda;

namespace {

// ==========================================================================================================
// The launches, emulated: grid (x, y) x threads
// ==========================================================================================================
int64_t emulate_scatter(const kc::ScatterArgs& args) {
  kc::ScatterArgs a = args;
  kc::LaunchPlan plan;
  if (!kc::plan_scatter(&a, &plan)) return 0;
  kc::dispatch_word(plan.word_bytes, [&](auto word) {
    using Word = decltype(word);
    const kc::ScatterGeometry g = kc::scatter_geometry(a, plan);
    for (int64_t layer_idx = 0; layer_idx < a.num_layers; ++layer_idx)    // blockIdx.y
      for (int64_t token_idx = 0; token_idx < a.num_tokens; ++token_idx)  // blockIdx.x
        for (int thread = 0; thread < plan.threads; ++thread)             // threadIdx.x
          kc::scatter_kv_cta(static_cast<const Word*>(a.src_k), static_cast<const Word*>(a.src_v),
                             static_cast<Word*>(a.k_cache), static_cast<Word*>(a.v_cache), g, token_idx, layer_idx,
                             thread, plan.threads);
  });
  return plan.word_bytes;
}

int64_t emulate_gather(const kc::GatherArgs& args) {
  kc::GatherArgs a = args;
  kc::LaunchPlan plan;
  if (!kc::plan_gather(&a, &plan)) return 0;
  kc::dispatch_word(plan.word_bytes, [&](auto word) {
    using Word = decltype(word);
    const kc::GatherGeometry g = kc::gather_geometry(a, plan);
    for (int64_t token_idx = 0; token_idx < a.num_tokens; ++token_idx)
      for (int thread = 0; thread < plan.threads; ++thread)
        kc::gather_kv_cta(static_cast<const Word*>(a.k_cache), static_cast<const Word*>(a.v_cache),
                          static_cast<Word*>(a.out_k), static_cast<Word*>(a.out_v), g, token_idx, thread,
                          plan.threads);
  });
  return plan.word_bytes;
}

// ==========================================================================================================
// One chunk through the GPU sink's enqueue, the CPU standing in for the device
// ==========================================================================================================
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] void value_error(const std::string& msg) {
  throw py::value_error("kvfast._C_cuda_host.sink_chunk: " + msg);
}

// What GpuSink::load enqueues after a chunk was read and checked, run here: "scatter" copies the staging slot to
// device staging (here: the same bytes) and scatters it with the kernel's arguments from chunk_scatter_args;
// "dma" copies each run from chunk_dma_runs. Returns the number of copies (kernel launches or runs).
int64_t sink_chunk(const std::string& method, std::array<int64_t, 7> chunk, uintptr_t staging, uintptr_t k_pages,
                   uintptr_t v_pages, std::array<int64_t, 7> geometry, int64_t elem_size, Int64Array block_table,
                   int64_t num_tokens) {
  if (method != "scatter" && method != "dma") value_error("method must be 'scatter' or 'dma', got '" + method + "'");
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8)
    value_error("elem_size must be 1, 2, 4 or 8");
  kvfast::PagedLayout layout;
  std::string problem = kc::parse_device_layout(geometry, elem_size, &layout);
  if (!problem.empty()) value_error(problem);
  if (method == "dma" && !layout.rows_contiguous())
    value_error("method 'dma' needs pages whose token rows are contiguous (NHD)");
  if (block_table.ndim() != 1) value_error("block_table must be 1-d");
  std::vector<int64_t> table(block_table.data(), block_table.data() + block_table.size());
  problem = kvfast::check_block_table(table, num_tokens, layout);
  if (!problem.empty()) value_error(problem);
  std::vector<kvfast::ChunkSpec> plan;  // the one row, checked as GpuLoadJob checks its plan
  problem = kvfast::parse_plan(chunk.data(), 1, chunk[1] + 1, num_tokens, layout.row_bytes(), &plan);
  if (!problem.empty()) value_error(problem);
  if (!staging || !k_pages || !v_pages) value_error("a buffer address is null");

  const kvfast::ChunkSpec& c = plan[0];
  const auto* src = reinterpret_cast<const uint8_t*>(staging);
  const kvfast::LayerDest dest = {{reinterpret_cast<uint8_t*>(k_pages), reinterpret_cast<uint8_t*>(v_pages)}};
  py::gil_scoped_release release;
  if (method == "scatter") {
    const std::vector<int64_t> slots = kc::token_slots(table, num_tokens, layout.block_size);
    return emulate_scatter(kc::chunk_scatter_args(layout, c, num_tokens, elem_size, src, dest, slots.data())) ? 1 : 0;
  }
  kc::CopyRuns runs;
  kc::chunk_dma_runs(layout, c, num_tokens, src, dest, table, &runs);
  for (size_t i = 0; i < runs.sizes.size(); ++i) std::memcpy(runs.dsts[i], runs.srcs[i], runs.sizes[i]);
  return static_cast<int64_t>(runs.sizes.size());
}

}  // namespace

PYBIND11_MODULE(_C_cuda_host, m) {
  m.doc() = "kvfast's CUDA kernels and GPU-sink arithmetic compiled for the CPU, for tests (kvfast/_C_cuda_host.pyi)";
  kc::def_paged_kv(
      m, [](const kc::ScatterArgs& a, int, uintptr_t) { return emulate_scatter(a); },
      [](const kc::GatherArgs& a, int, uintptr_t) { return emulate_gather(a); });
  m.def("sink_chunk", &sink_chunk, py::arg("method"), py::arg("chunk"), py::arg("staging"), py::arg("k_pages"),
        py::arg("v_pages"), py::arg("layout"), py::arg("elem_size"), py::arg("block_table"), py::arg("num_tokens"),
        "Write one checked chunk's stored bytes (at `staging`) into host pages as the GPU sink would on the device; "
        "returns the number of copies (scatter: kernel launches, dma: runs).");
}
