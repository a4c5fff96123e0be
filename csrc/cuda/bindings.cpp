// kvfast._C_cuda: declarations and exports only; the kernels and launchers live in paged_kv.cu.
//
// Pointers and the stream arrive as Python ints (tensor.data_ptr(), torch.cuda.Stream.cuda_stream), so this
// module links against the CUDA runtime alone, never against libtorch: it builds without torch headers and
// works with whichever torch the GPU machine has. The torch-tensor wrappers are kvfast/kernels/cuda.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu_sink.h"
#include "load_plan.h"
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

// ==========================================================================================================
// GpuLoadJob: kvfast._C's LoadJob with the GPU sink; the same plan checks (load_plan.h) and error tuples
// ==========================================================================================================
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error("kvfast._C_cuda.GpuLoadJob: " + msg); }

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

struct PyGpuLoadJob {
  std::shared_ptr<kc::GpuSink> sink;  // declared first: outlives the job's threads
  std::unique_ptr<kvfast::LoadJob> job;
  int64_t num_layers = 0;
  std::string method;
  int threads = 0;

  ~PyGpuLoadJob() {
    py::gil_scoped_release release;  // joins the workers, then waits for the streams
    job.reset();
    sink.reset();
  }
  void check_layer(int64_t layer) const {
    if (layer < 0 || layer >= num_layers)
      throw py::index_error("layer " + std::to_string(layer) + " out of range [0, " + std::to_string(num_layers) +
                            ")");
  }
};

void raise_status(const kvfast::Status& s) {
  if (!s.ok()) throw std::runtime_error(s.detail);
}

// k_pages[l], v_pages[l]: device addresses of layer l's pages; layout: (num_blocks, block_size, num_heads,
// head_bytes, block_stride, token_stride, head_stride), strides in bytes, as for kvfast._C.LoadJob's arrays.
std::unique_ptr<PyGpuLoadJob> make_gpu_job(int fd, Int64Array chunks, std::vector<uintptr_t> k_pages,
                                           std::vector<uintptr_t> v_pages, std::array<int64_t, 7> geometry,
                                           int64_t elem_size, Int64Array block_table, int64_t num_tokens, int device,
                                           const std::string& method, const std::string& read, int threads,
                                           bool verify, uint64_t piece_bytes, int ring_slots) {
  std::string problem = kvfast::check_load_args(fd, num_tokens, threads, piece_bytes);
  if (!problem.empty()) value_error(problem);
  kvfast::LoadOptions options;
  if (!kvfast::parse_method(read, &options.method))
    value_error("read must be 'preadv', 'mmap' or 'odirect', got '" + read + "'");
  if (method != "scatter" && method != "dma") value_error("method must be 'scatter' or 'dma', got '" + method + "'");
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) value_error("elem_size must be 1, 2, 4 or 8");
  if (ring_slots < 2 || ring_slots > 64) value_error("ring_slots must be in [2, 64]");
  if (device < 0) value_error("device must be >= 0");
  options.threads = threads;
  options.verify = verify;
  options.piece_bytes = piece_bytes;

  kvfast::PagedLayout layout;
  layout.num_blocks = geometry[0];
  layout.block_size = geometry[1];
  layout.num_heads = geometry[2];
  layout.head_bytes = geometry[3];
  layout.block_stride = geometry[4];
  layout.token_stride = geometry[5];
  layout.head_stride = geometry[6];
  for (int64_t g : geometry)
    if (g < 0) value_error("layout holds a negative size or stride");
  if (layout.num_blocks < 1 || layout.block_size < 1 || layout.num_heads < 1 || layout.head_bytes < 1 ||
      layout.head_bytes % elem_size != 0)
    value_error("layout must have num_blocks, block_size, num_heads >= 1 and head_bytes a multiple of elem_size");
  if (layout.block_stride % elem_size || layout.token_stride % elem_size || layout.head_stride % elem_size)
    value_error("layout strides must be multiples of elem_size");
  if (k_pages.empty() || k_pages.size() != v_pages.size()) value_error("k_pages and v_pages must name the same layers");
  std::vector<kvfast::LayerDest> dests;
  for (size_t l = 0; l < k_pages.size(); ++l) {
    if (!k_pages[l] || !v_pages[l]) value_error("a page address is null");
    dests.push_back({{reinterpret_cast<uint8_t*>(k_pages[l]), reinterpret_cast<uint8_t*>(v_pages[l])}});
  }

  if (block_table.ndim() != 1) value_error("block_table must be 1-d");
  std::vector<int64_t> table(block_table.data(), block_table.data() + block_table.size());
  problem = kvfast::check_block_table(table, num_tokens, layout);
  if (!problem.empty()) value_error(problem);
  if (chunks.ndim() != 2 || chunks.shape(1) != 7)
    value_error("chunks must be [n >= 1, 7]: index, layer, start, stop, offset, length, crc32c");
  std::vector<kvfast::ChunkSpec> plan;
  problem = kvfast::parse_plan(chunks.data(), chunks.shape(0), static_cast<int64_t>(dests.size()), num_tokens,
                               layout.row_bytes(), &plan);
  if (!problem.empty()) value_error(problem);

  auto result = std::make_unique<PyGpuLoadJob>();
  result->num_layers = static_cast<int64_t>(dests.size());
  result->method = method;
  result->threads = std::min<int>(threads, static_cast<int>(plan.size()));
  uint64_t max_chunk = 0;
  for (const kvfast::ChunkSpec& c : plan) max_chunk = std::max(max_chunk, c.length);
  kc::GpuSinkOptions sink_options;
  sink_options.device = device;
  sink_options.dma = method == "dma";
  sink_options.verify = verify;
  sink_options.piece_bytes = piece_bytes;
  sink_options.ring_slots = ring_slots;
  sink_options.elem_size = elem_size;
  {
    py::gil_scoped_release release;  // pinning and stream creation take a while
    try {
      result->sink = std::make_shared<kc::GpuSink>(layout, dests, table, num_tokens, result->threads, max_chunk,
                                                   sink_options);
    } catch (const std::invalid_argument& e) {
      py::gil_scoped_acquire acquire;
      value_error(e.what());
    }
    try {
      result->job = std::make_unique<kvfast::LoadJob>(fd, std::move(plan), layout, std::move(dests), std::move(table),
                                                      num_tokens, options, result->sink);
    } catch (const kvfast::SourceError& e) {
      py::gil_scoped_acquire acquire;
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.status.err, e.status.detail).ptr());
      throw py::error_already_set();
    }
  }
  return result;
}

py::object gpu_job_error(const PyGpuLoadJob& self) {
  kvfast::LoadError e = self.job->error();
  if (e.kind == kvfast::ErrorKind::kNone) return py::none();
  return py::make_tuple(kvfast::error_kind_name(e.kind), e.plan_pos, e.err, e.offset, e.detail);
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
  py::class_<PyGpuLoadJob>(m, "GpuLoadJob",
                           "A load of .kvf chunks into a GPU's paged K/V pages: worker threads read into pinned "
                           "staging slots, CUDA streams copy (and scatter) them into the pages.")
      .def(py::init(&make_gpu_job), py::arg("fd"), py::arg("chunks"), py::arg("k_pages"), py::arg("v_pages"),
           py::arg("layout"), py::arg("elem_size"), py::arg("block_table"), py::arg("num_tokens"), py::arg("device"),
           py::kw_only(), py::arg("method") = "scatter", py::arg("read") = "preadv", py::arg("threads") = 2,
           py::arg("verify") = true, py::arg("piece_bytes") = 256 << 10, py::arg("ring_slots") = 3)
      .def_readonly("method", &PyGpuLoadJob::method)
      .def_readonly("threads", &PyGpuLoadJob::threads)
      .def("layer_ready",
           [](PyGpuLoadJob& self, int64_t layer) {
             self.check_layer(layer);
             return self.job->layer_ready(layer) && self.sink->layer_landed(layer);
           },
           py::arg("layer"), "Whether layer `layer` is in the pages (enqueued and landed on the device).")
      .def("wait_layer",
           [](PyGpuLoadJob& self, int64_t layer, double timeout) {
             self.check_layer(layer);
             py::gil_scoped_release release;
             if (!self.job->wait_layer(layer, timeout)) return false;
             if (self.job->layer_ready(layer)) raise_status(self.sink->synchronize_layer(layer));
             return true;
           },
           py::arg("layer"), py::arg("timeout") = -1.0,
           "Block until layer `layer` landed or the job stopped; the timeout bounds the wait for it to be enqueued.")
      .def("stream_wait_layer",
           [](PyGpuLoadJob& self, int64_t layer, uintptr_t stream) {
             self.check_layer(layer);
             py::gil_scoped_release release;
             self.job->wait_layer(layer, -1.0);
             if (!self.job->layer_ready(layer)) return false;
             raise_status(self.sink->stream_wait_layer(layer, as_stream(stream)));
             return true;
           },
           py::arg("layer"), py::arg("stream"),
           "Make `stream` wait for layer `layer` (the host waits only until it is enqueued). False if the job failed.")
      .def("wait",
           [](PyGpuLoadJob& self, double timeout) {
             py::gil_scoped_release release;
             if (!self.job->wait(timeout)) return false;
             raise_status(self.sink->synchronize());
             return true;
           },
           py::arg("timeout") = -1.0, "Block until every worker stopped and everything enqueued landed.")
      .def("finished", [](const PyGpuLoadJob& self) { return self.job->finished(); })
      .def("error", &gpu_job_error)
      .def("cancel", [](PyGpuLoadJob& self) { self.job->cancel(); });
  m.def("device_count", &device_count, "CUDA devices this module's runtime sees (0 without a driver or GPU).");
  m.def("runtime_version", &runtime_version, "The CUDA runtime version linked in, e.g. 13000 for 13.0.");
}
