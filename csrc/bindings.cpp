// kvfast._C: declarations and exports only; each routine lives in its own file.
#include <pybind11/pybind11.h>

#include "crc32c.h"

namespace py = pybind11;

namespace {

uint32_t py_crc32c(py::buffer data, uint32_t value) {
  py::buffer_info info = data.request();  // any contiguous buffer: bytes, memoryview, numpy, mmap
  const size_t nbytes = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  py::gil_scoped_release release;
  return kvfast::crc32c(info.ptr, nbytes, value);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvfast native routines (see kvfast/_C.pyi)";
  m.def("crc32c", &py_crc32c, py::arg("data"), py::arg("value") = 0,
        "CRC-32C of a contiguous buffer, continuing from `value` (0 to start). Releases the GIL.");
  m.def("crc32c_impl", &kvfast::crc32c_impl, "Which CRC-32C implementation runs: 'sse4.2' or 'software'.");
}
