// kvfast._C: declarations, the checks at the Python boundary, and exports; each routine lives in its own file.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "crc32c.h"
#include "expcode.h"
#include "load_plan.h"
#include "paged_loader.h"

namespace py = pybind11;

namespace {

uint32_t py_crc32c(py::buffer data, uint32_t value) {
  py::buffer_info info = data.request();  // any contiguous buffer: bytes, memoryview, numpy, mmap
  const size_t nbytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  py::gil_scoped_release release;
  return kvfast::crc32c(info.ptr, nbytes, value);
}

// ==========================================================================================================
// LoadJob glue: validate once, here, then hand plain structs to the job
// ==========================================================================================================
[[noreturn]] void value_error(const std::string& msg) { throw py::value_error("kvfast._C: " + msg); }

// A job plus the Python objects whose memory it writes into, released only after its threads stopped.
struct PyLoadJob {
  std::vector<py::object> keep_alive;  // destination page arrays (declared first: destroyed last)
  std::unique_ptr<kvfast::LoadJob> job;
  std::string method;
  int threads = 0;

  ~PyLoadJob() {
    py::gil_scoped_release release;  // joining waits for the chunk each worker is on
    job.reset();
  }
};

// One destination page array: uint8 [num_blocks, block_size, H, head_bytes] with a contiguous last axis (what
// loader.py passes for NHD, or a permuted view for HND), or uint8 [num_blocks, block_size, H, D, itemsize] with
// a contiguous last axis and D at any stride (vLLM CPU's K); any non-negative strides otherwise. Every K array
// must match the first K's layout, every V array the first V's; K and V only in shape.
uint8_t* page_pointer(const py::handle& obj, kvfast::PagedLayout* layout, bool first, const std::string& what) {
  py::buffer buffer = py::reinterpret_borrow<py::buffer>(obj);
  py::buffer_info info = buffer.request(/*writable=*/true);
  if ((info.ndim != 4 && info.ndim != 5) || info.itemsize != 1 ||
      info.format != py::format_descriptor<uint8_t>::format())
    value_error(what + " must be a uint8 array [num_blocks, block_size, num_heads, head_bytes] or [num_blocks, "
                "block_size, num_heads, head_dim, itemsize]");
  const py::ssize_t last = info.ndim - 1;
  if (info.strides[last] != 1) value_error(what + " must be contiguous along its last axis");
  for (py::ssize_t i = 0; i <= last; ++i) {
    if (info.shape[i] < 1) value_error(what + " has an empty axis");
    if (info.strides[i] < 0) value_error(what + " has a negative stride");
  }
  kvfast::PagedLayout here;
  here.num_blocks = info.shape[0];
  here.block_size = info.shape[1];
  here.num_heads = info.shape[2];
  here.head_bytes = info.ndim == 4 ? info.shape[3] : info.shape[3] * info.shape[4];
  here.block_stride = info.strides[0];
  here.token_stride = info.strides[1];
  here.head_stride = info.strides[2];
  if (info.ndim == 5 && info.shape[3] > 1 && info.strides[3] != info.shape[4]) {  // else the head row is contiguous
    if (info.shape[4] != 2 && info.shape[4] != 4 && info.shape[4] != 8)
      value_error(what + ": itemsize must be 2, 4 or 8 bytes");
    here.elem_bytes = info.shape[4];
    here.elem_stride = info.strides[3];
  }
  if (first) {
    *layout = here;
  } else if (here.num_blocks != layout->num_blocks || here.block_size != layout->block_size ||
             here.num_heads != layout->num_heads || here.head_bytes != layout->head_bytes ||
             here.block_stride != layout->block_stride || here.token_stride != layout->token_stride ||
             here.head_stride != layout->head_stride || here.elem_bytes != layout->elem_bytes ||
             here.elem_stride != layout->elem_stride) {
    value_error(what + " differs in shape or strides from the same pages (K or V) of layer 0");
  }
  return static_cast<uint8_t*>(info.ptr);
}

std::unique_ptr<PyLoadJob> make_job(int fd, py::array_t<int64_t, py::array::c_style | py::array::forcecast> chunks,
                                    py::sequence dests,
                                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> block_table,
                                    int64_t num_tokens, const std::string& method, int threads, bool verify,
                                    uint64_t piece_bytes) {
  auto result = std::make_unique<PyLoadJob>();
  kvfast::LoadOptions options;
  if (!kvfast::parse_method(method, &options.method))
    value_error("method must be 'preadv', 'mmap' or 'odirect', got '" + method + "'");
  std::string problem = kvfast::check_load_args(fd, num_tokens, threads, piece_bytes);
  if (!problem.empty()) value_error(problem);
  options.threads = threads;
  options.verify = verify;
  options.piece_bytes = piece_bytes;

  // destinations: [(K pages, V pages)] per layer, all K of one geometry, all V of one geometry
  kvfast::PageLayouts layouts;
  std::vector<kvfast::LayerDest> layer_dests;
  const size_t num_layers = py::len(dests);
  if (num_layers < 1) value_error("dests must name at least one layer");
  for (size_t l = 0; l < num_layers; ++l) {
    py::sequence pair = dests[l].cast<py::sequence>();
    if (py::len(pair) != 2) value_error("dests[" + std::to_string(l) + "] must be (K pages, V pages)");
    kvfast::LayerDest d;
    for (int kv = 0; kv < 2; ++kv) {
      py::object pages = pair[kv];
      d.pages[kv] = page_pointer(pages, &layouts[kv], l == 0,
                                 "dests[" + std::to_string(l) + "][" + std::to_string(kv) + "]");
      result->keep_alive.push_back(pages);
    }
    layer_dests.push_back(d);
  }
  const kvfast::PagedLayout& layout = layouts[0];
  const kvfast::PagedLayout& v = layouts[1];
  if (v.num_blocks != layout.num_blocks || v.block_size != layout.block_size || v.num_heads != layout.num_heads ||
      v.head_bytes != layout.head_bytes)
    value_error("dests: V pages differ in shape from K pages");

  // block table and plan: the same checks as kvfast._C_cuda's (load_plan.h)
  if (block_table.ndim() != 1) value_error("block_table must be 1-d");
  std::vector<int64_t> table(block_table.data(), block_table.data() + block_table.size());
  problem = kvfast::check_block_table(table, num_tokens, layout);
  if (!problem.empty()) value_error(problem);
  if (chunks.ndim() != 2 || chunks.shape(1) != 7)
    value_error("chunks must be [n >= 1, 7]: index, layer, start, stop, offset, length, crc32c");
  std::vector<kvfast::ChunkSpec> plan;
  problem = kvfast::parse_plan(chunks.data(), chunks.shape(0), static_cast<int64_t>(num_layers), num_tokens,
                               layout.row_bytes(), &plan);
  if (!problem.empty()) value_error(problem);

  result->method = method;
  result->threads = std::min<int>(threads, static_cast<int>(plan.size()));
  try {
    result->job = std::make_unique<kvfast::LoadJob>(fd, std::move(plan), layouts, std::move(layer_dests),
                                                    std::move(table), num_tokens, options);
  } catch (const kvfast::SourceError& e) {
    PyErr_SetObject(PyExc_OSError, py::make_tuple(e.status.err, e.status.detail).ptr());
    throw py::error_already_set();
  }
  return result;
}

// gather_pages: the block table checked as a load's is, `out` checked to hold exactly the packed rows.
void py_gather_pages(const py::object& pages,
                     py::array_t<int64_t, py::array::c_style | py::array::forcecast> block_table, int64_t num_tokens,
                     py::buffer out) {
  kvfast::PagedLayout layout;
  const uint8_t* src = page_pointer(pages, &layout, true, "pages");
  if (block_table.ndim() != 1) value_error("block_table must be 1-d");
  if (num_tokens < 1) value_error("num_tokens must be >= 1");
  std::vector<int64_t> table(block_table.data(), block_table.data() + block_table.size());
  const std::string problem = kvfast::check_block_table(table, num_tokens, layout);
  if (!problem.empty()) value_error(problem);
  py::buffer_info info = out.request(/*writable=*/true);
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t i = info.ndim; i-- > 0;) {
    if (info.shape[i] > 1 && info.strides[i] != expect) value_error("out must be C-contiguous");
    expect *= info.shape[i];
  }
  if (info.size * info.itemsize != num_tokens * layout.row_bytes())
    value_error("out must hold num_tokens * num_heads * head_bytes = " +
                std::to_string(num_tokens * layout.row_bytes()) + " bytes, got " +
                std::to_string(info.size * info.itemsize));
  py::gil_scoped_release release;
  kvfast::gather_pages(layout, src, table, num_tokens, static_cast<uint8_t*>(info.ptr));
}

py::object job_error(const PyLoadJob& self) {
  kvfast::LoadError e = self.job->error();
  if (e.kind == kvfast::ErrorKind::kNone) return py::none();
  return py::make_tuple(kvfast::error_kind_name(e.kind), e.plan_pos, e.err, e.offset, e.detail);
}

void check_layer(const PyLoadJob& self, int64_t layer) {
  const size_t num_layers = self.keep_alive.size() / 2;  // a (K, V) pair per layer
  if (layer < 0 || layer >= static_cast<int64_t>(num_layers))
    throw py::index_error("layer " + std::to_string(layer) + " out of range [0, " + std::to_string(num_layers) + ")");
}

// ==========================================================================================================
// expcode glue (csrc/expcode.h): shapes and buffer sizes checked here, the codec assumes them
// ==========================================================================================================
[[noreturn]] void codec_error(const std::string& msg) { throw py::value_error("kvfast._C.expcode: " + msg); }

kvfast::expcode::ChunkShape codec_shape(int64_t tokens, int64_t heads, int64_t head_dim, int itemsize) {
  // the format's limits (kvfast/format.py §3) keep every size below 2**62
  if (tokens < 1 || tokens > (int64_t{1} << 20) || heads < 1 || heads > 4096 || head_dim < 1 || head_dim > 65536)
    codec_error("tokens, heads and head_dim must be within the format's limits");
  if (itemsize != 2 && itemsize != 4) codec_error("itemsize must be 2 or 4, got " + std::to_string(itemsize));
  return {tokens, heads, head_dim, itemsize};
}

// A C-contiguous buffer's bytes: (pointer, size).
std::pair<uint8_t*, size_t> contiguous(const py::buffer& obj, bool writable, const char* what) {
  py::buffer_info info = obj.request(writable);
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t i = info.ndim; i-- > 0;) {
    if (info.shape[i] > 1 && info.strides[i] != expect) codec_error(std::string(what) + " must be C-contiguous");
    expect *= info.shape[i];
  }
  return {static_cast<uint8_t*>(info.ptr), static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize)};
}

py::bytes py_expcode_encode(py::buffer k, py::buffer v, int64_t tokens, int64_t heads, int64_t head_dim,
                            int itemsize, int64_t seg_tokens, int threads, bool repeats) {
  const auto shape = codec_shape(tokens, heads, head_dim, itemsize);
  auto [kp, kn] = contiguous(k, false, "k");
  auto [vp, vn] = contiguous(v, false, "v");
  const size_t want = static_cast<size_t>(shape.elements()) * itemsize;
  if (kn != want || vn != want)
    codec_error("k and v must each hold tokens * heads * head_dim * itemsize = " + std::to_string(want) + " bytes");
  if (seg_tokens < 1 || seg_tokens > tokens) codec_error("seg_tokens must be in [1, tokens]");
  if (threads < 1 || threads > 256) codec_error("threads must be in [1, 256]");
  std::vector<uint8_t> out;
  {
    py::gil_scoped_release release;
    out = kvfast::expcode::encode(kp, vp, shape, seg_tokens, repeats, threads);
  }
  return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
}

void py_expcode_decode(py::buffer src, py::buffer out, int64_t tokens, int64_t heads, int64_t head_dim,
                       int itemsize, int threads, bool repeats) {
  const auto shape = codec_shape(tokens, heads, head_dim, itemsize);
  auto [sp, sn] = contiguous(src, false, "src");
  auto [op, on] = contiguous(out, true, "out");
  if (on != 2 * static_cast<size_t>(shape.elements()) * itemsize)
    codec_error("out must hold 2 * tokens * heads * head_dim * itemsize bytes");
  if (threads < 1 || threads > 256) codec_error("threads must be in [1, 256]");
  std::string problem;
  {
    py::gil_scoped_release release;
    problem = kvfast::expcode::decode(sp, sn, op, shape, repeats, threads);
  }
  if (!problem.empty()) throw py::value_error(problem);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvfast native routines (see kvfast/_C.pyi)";
  m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("value") = 0,
        "CRC-32C of a contiguous buffer, continuing from `value` (0 to start). Releases the GIL.");
  m.def("crc32c_impl", &kvfast::crc32c_impl,
        "Which CRC-32C implementation runs: 'avx512-vpclmulqdq', 'sse4.2' or 'software'.");
  m.def("expcode_encode", &py_expcode_encode, py::arg("k"), py::arg("v"), py::arg("tokens"), py::arg("heads"),
        py::arg("head_dim"), py::arg("itemsize"), py::arg("seg_tokens"), py::arg("threads") = 1, py::kw_only(),
        py::arg("repeats"),
        "expcode: encode one chunk (K, V [tokens, heads, head_dim] raw bytes); repeats: v2 (True) or v1. Releases "
        "the GIL.");
  m.def("expcode_decode", &py_expcode_decode, py::arg("src"), py::arg("out"), py::arg("tokens"), py::arg("heads"),
        py::arg("head_dim"), py::arg("itemsize"), py::arg("threads") = 1, py::kw_only(), py::arg("repeats"),
        "expcode: decode one chunk into out (K then V); repeats: v2 (True) or v1; ValueError naming the field on bad "
        "input. Releases the GIL.");

  m.def("gather_pages", &py_gather_pages, py::arg("pages"), py::arg("block_table"), py::arg("num_tokens"),
        py::arg("out"),
        "Tokens [0, num_tokens) over block_table out of one layer's K or V pages (a uint8 view as LoadJob takes) "
        "into out, packed [num_tokens, H, head_bytes]: the mirror of a load's scatter. Releases the GIL.");

  py::class_<PyLoadJob>(m, "LoadJob", "A load of .kvf chunks into host paged K/V pages, running on its own threads.")
      .def(py::init(&make_job), py::arg("fd"), py::arg("chunks"), py::arg("dests"), py::arg("block_table"),
           py::arg("num_tokens"), py::kw_only(), py::arg("method") = "preadv", py::arg("threads") = 1,
           py::arg("verify") = true, py::arg("piece_bytes") = 256 << 10)
      .def_readonly("method", &PyLoadJob::method)
      .def_readonly("threads", &PyLoadJob::threads)
      .def("layer_ready",
           [](const PyLoadJob& self, int64_t layer) {
             check_layer(self, layer);
             return self.job->layer_ready(layer);
           },
           py::arg("layer"))
      .def("wait_layer",
           [](PyLoadJob& self, int64_t layer, double timeout) {
             check_layer(self, layer);
             py::gil_scoped_release release;
             return self.job->wait_layer(layer, timeout);
           },
           py::arg("layer"), py::arg("timeout") = -1.0)
      .def("wait",
           [](PyLoadJob& self, double timeout) {
             py::gil_scoped_release release;
             return self.job->wait(timeout);
           },
           py::arg("timeout") = -1.0)
      .def("finished", [](const PyLoadJob& self) { return self.job->finished(); })
      .def("error", &job_error)
      .def("cancel", [](PyLoadJob& self) { self.job->cancel(); });
}
