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
#include <mutex>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "gpu_sink.h"
#include "load_plan.h"
#include "paged_kv.h"
#include "paged_kv_py.h"
#include "sink_plan.h"

namespace py = pybind11;
namespace kc = kvfast::cuda;

namespace {

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

int device_count() {
  int count = 0;
  // No driver or no device is an answer here, not an error: 0.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    kc::clear_last_error();  // so the next launch does not report it as its own
    return 0;
  }
  return count;
}

int runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);  // needs no driver: it reports the runtime linked into this module
  return version;
}

int driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) kc::clear_last_error();
  return version;  // 0 without a driver
}

py::dict staging_pool_stats(int device) {
  const kc::StagingPoolStats s = kc::StagingPool::of_device(device).stats();
  py::dict d;
  d["allocations"] = s.allocations;
  d["cached_buffers"] = s.cached_buffers;
  d["cached_bytes"] = s.cached_bytes;
  d["in_use"] = s.in_use;
  return d;
}

void trim_staging_pool(int device) {
  py::gil_scoped_release release;
  kc::DeviceGuard guard(device);
  guard.check();
  kc::StagingPool::of_device(device).trim();
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
  std::mutex mutex;            // guards device_error
  kvfast::Status device_error;  // the first CUDA failure seen after the workers enqueued (waits, queries)

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
  // A failed wait or query becomes the job's error (error() reports it, and the Python side frees the sequence's
  // blocks as for any failed load) instead of an exception that would skip that clean-up. Returns s.ok().
  bool record(kvfast::Status s) {
    if (s.ok()) return true;
    std::lock_guard<std::mutex> lock(mutex);
    if (device_error.ok()) device_error = std::move(s);
    return false;
  }
};

// k_pages[l], v_pages[l]: device addresses of layer l's pages; layout: (num_blocks, block_size, num_heads,
// head_bytes, block_stride, token_stride, head_stride), strides in bytes, as for kvfast._C.LoadJob's arrays.
// stream: the caller's current stream on `device`; the load's writes start after the work queued there.
std::unique_ptr<PyGpuLoadJob> make_gpu_job(int fd, Int64Array chunks, std::vector<uintptr_t> k_pages,
                                           std::vector<uintptr_t> v_pages, std::array<int64_t, 7> geometry,
                                           int64_t elem_size, Int64Array block_table, int64_t num_tokens, int device,
                                           uintptr_t stream, const std::string& method, const std::string& read,
                                           int threads, bool verify, uint64_t piece_bytes, int ring_slots) {
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
  problem = kc::parse_device_layout(geometry, elem_size, &layout);
  if (!problem.empty()) value_error(problem);
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
  sink_options.after = as_stream(stream);
  {
    py::gil_scoped_release release;  // stream creation (and the pool's first allocations) take a while
    try {
      result->sink = std::make_shared<kc::GpuSink>(layout, dests, table, num_tokens, result->threads, max_chunk,
                                                   sink_options);
    } catch (const std::invalid_argument& e) {
      py::gil_scoped_acquire acquire;
      value_error(e.what());
    }
    try {
      result->job = std::make_unique<kvfast::LoadJob>(fd, std::move(plan), kvfast::PageLayouts{layout, layout},
                                                      std::move(dests), std::move(table),
                                                      num_tokens, options, result->sink);
    } catch (const kvfast::SourceError& e) {
      py::gil_scoped_acquire acquire;
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.status.err, e.status.detail).ptr());
      throw py::error_already_set();
    }
  }
  return result;
}

// None, or (kind, plan position, errno, offset, detail); a CUDA failure after the workers ran has position -1.
py::object gpu_job_error(PyGpuLoadJob& self) {
  kvfast::LoadError e = self.job->error();
  if (e.kind != kvfast::ErrorKind::kNone)
    return py::make_tuple(kvfast::error_kind_name(e.kind), e.plan_pos, e.err, e.offset, e.detail);
  std::lock_guard<std::mutex> lock(self.mutex);
  if (self.device_error.ok()) return py::none();
  return py::make_tuple(kvfast::error_kind_name(self.device_error.kind), -1, 0, 0, self.device_error.detail);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kvfast CUDA paged-cache kernels over raw device pointers (see kvfast/_C_cuda.pyi)";
  kc::def_paged_kv(
      m,
      [](const kc::ScatterArgs& a, int device, uintptr_t stream) {
        return kc::scatter_kv(a, device, as_stream(stream));
      },
      [](const kc::GatherArgs& a, int device, uintptr_t stream) {
        return kc::gather_kv(a, device, as_stream(stream));
      });
  py::class_<PyGpuLoadJob>(m, "GpuLoadJob",
                           "A load of .kvf chunks into a GPU's paged K/V pages: worker threads read into pinned "
                           "staging slots, CUDA streams copy (and scatter) them into the pages.")
      .def(py::init(&make_gpu_job), py::arg("fd"), py::arg("chunks"), py::arg("k_pages"), py::arg("v_pages"),
           py::arg("layout"), py::arg("elem_size"), py::arg("block_table"), py::arg("num_tokens"), py::arg("device"),
           py::kw_only(), py::arg("stream") = 0, py::arg("method") = "scatter", py::arg("read") = "preadv",
           py::arg("threads") = 2, py::arg("verify") = true, py::arg("piece_bytes") = 256 << 10,
           py::arg("ring_slots") = 3)
      .def_readonly("method", &PyGpuLoadJob::method)
      .def_readonly("threads", &PyGpuLoadJob::threads)
      .def("layer_ready",
           [](PyGpuLoadJob& self, int64_t layer) {
             self.check_layer(layer);
             py::gil_scoped_release release;
             bool landed = false;
             return self.job->layer_ready(layer) && self.record(self.sink->layer_landed(layer, &landed)) && landed;
           },
           py::arg("layer"), "Whether layer `layer` is in the pages (enqueued and landed on the device).")
      .def("wait_layer",
           [](PyGpuLoadJob& self, int64_t layer, double timeout) {
             self.check_layer(layer);
             py::gil_scoped_release release;
             if (!self.job->wait_layer(layer, timeout)) return false;
             if (self.job->layer_ready(layer)) self.record(self.sink->synchronize_layer(layer));
             return true;
           },
           py::arg("layer"), py::arg("timeout") = -1.0,
           "Block until layer `layer` landed or the job stopped; the timeout bounds the wait for it to be enqueued.")
      .def("stream_wait_layer",
           [](PyGpuLoadJob& self, int64_t layer, uintptr_t stream) {
             self.check_layer(layer);
             py::gil_scoped_release release;
             self.job->wait_layer(layer, -1.0);
             return self.job->layer_ready(layer) && self.record(self.sink->stream_wait_layer(layer, as_stream(stream)));
           },
           py::arg("layer"), py::arg("stream"),
           "Make `stream` (a handle on the load's device; 0: its legacy default stream) wait for layer `layer`; the "
           "host waits only until it is enqueued. False if the job failed.")
      .def("wait",
           [](PyGpuLoadJob& self, double timeout) {
             py::gil_scoped_release release;
             if (!self.job->wait(timeout)) return false;
             if (self.record(self.sink->synchronize())) self.sink->recycle();
             return true;
           },
           py::arg("timeout") = -1.0,
           "Block until every worker stopped and everything enqueued landed (a CUDA failure becomes error()).")
      .def("finished",
           [](PyGpuLoadJob& self) {
             py::gil_scoped_release release;
             if (!self.job->finished()) return false;
             bool landed = false;
             return !self.record(self.sink->landed(&landed)) || landed;  // failed: wait() returns at once too
           },
           "Whether every worker stopped and every copy it enqueued landed (wait() then returns at once).")
      .def("error", &gpu_job_error)
      .def("cancel", [](PyGpuLoadJob& self) { self.job->cancel(); });
  m.def("device_count", &device_count, "CUDA devices this module's runtime sees (0 without a driver or GPU).");
  m.def("runtime_version", &runtime_version, "The CUDA runtime version linked in, e.g. 13000 for 13.0.");
  m.def("driver_version", &driver_version, "The installed driver's CUDA version, e.g. 13000; 0 without a driver.");
  m.def("staging_pool_stats", &staging_pool_stats, py::arg("device"),
        "The pinned staging pool of `device`: allocations, cached_buffers, cached_bytes, in_use.");
  m.def("trim_staging_pool", &trim_staging_pool, py::arg("device"),
        "Free every idle staging buffer of `device` (waits for the device, like cudaFree).");
}
