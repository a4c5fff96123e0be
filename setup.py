"""Builds kvfast._C, the optional native extension (pybind11), and kvfast._C_cuda when nvcc is found.

The extensions are optional when installing: without a C++ toolchain kvfast falls back, loudly, to its
pure-Python reference path. KVFAST_REQUIRE_NATIVE makes a missing extension an error instead:

    =1      every extension this machine can build must build (CI): kvfast._C, kvfast._C_cuda_host, and
            kvfast._C_cuda when nvcc is found (without nvcc it is skipped, with a line saying so)
    =cuda   as =1, and nvcc must be found: a GPU machine's build (bench/gpu_check.sh), where a skipped
            kvfast._C_cuda would make every CUDA test skip and the run look green

kvfast._C_cuda_host needs no CUDA at all: the CUDA kernels' bodies and the GPU sink's per-chunk arithmetic
compiled for the CPU (csrc/cuda/host_emulation.cpp), so CI tests the CUDA code on machines without a GPU.

kvfast._C_cuda (csrc/cuda/) is a separate module so that kvfast._C imports on machines without CUDA. It is
built only when nvcc is found (CUDA_HOME/bin, CUDA_PATH/bin or PATH): nvcc compiles the .cu files to objects,
the host compiler builds the pybind11 bindings and links them with the CUDA runtime, statically, so the module
needs no libcudart.so at import and no torch at all (pointers and streams cross as ints).
KVFAST_CUDA_ARCHS (default "80;90") lists the SM targets; PTX of the newest is embedded so newer cards JIT.
"""
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
except ImportError:  # only without build isolation and without pybind11
    Pybind11Extension = None
else:  # each extension's host sources compile in parallel (KVFAST_BUILD_JOBS, default: every core)
    ParallelCompile("KVFAST_BUILD_JOBS", default=0).install()

REQUIRE = os.environ.get("KVFAST_REQUIRE_NATIVE", "")
if REQUIRE not in ("", "0", "1", "cuda"):
    raise RuntimeError(f"KVFAST_REQUIRE_NATIVE must be unset, 0, 1 or cuda, got {REQUIRE!r}")
REQUIRED = REQUIRE in ("1", "cuda")


# -- CUDA: find nvcc and the toolkit it belongs to ------------------------------------------------------
def find_nvcc():
    """The nvcc to use, or None: CUDA_HOME/bin, CUDA_PATH/bin, then PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def cuda_toolkit_dirs(nvcc):
    """(include dirs, library dirs) of nvcc's toolkit, as nvcc itself reports them.

    Asking nvcc (--dryrun prints its INCLUDES and LIBRARIES) is right for wrapper scripts, conda layouts and
    targets/<arch>/ trees, where guessing from nvcc's path is not.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.path.join(tmp, "x.o")],
                             capture_output=True, text=True, check=False)
    includes, libraries = [], []
    for line in (out.stdout + out.stderr).splitlines():
        key, _, value = line.removeprefix("#$ ").partition("=")
        if key.strip() in ("INCLUDES", "LIBRARIES"):
            for flag in shlex.split(value):
                if flag.startswith("-I"):
                    includes.append(flag[2:])
                elif flag.startswith("-L") and not flag.rstrip("/").endswith("stubs"):
                    libraries.append(flag[2:])
    if not includes:  # an nvcc that prints nothing useful: fall back to the usual layout
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        includes, libraries = [os.path.join(home, "include")], [os.path.join(home, "lib64")]
    return includes, libraries


def nvcc_arch_flags():
    """-gencode flags: SASS for each KVFAST_CUDA_ARCHS entry, plus PTX of the newest for later cards."""
    archs = sorted({a.strip() for a in os.environ.get("KVFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
                    if a.strip()}, key=int)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class NvccExtension(Pybind11Extension if Pybind11Extension is not None else object):
    """A pybind11 extension whose ``cuda_sources`` nvcc compiles to objects that are linked into it."""

    def __init__(self, name, sources, *, cuda_sources, nvcc, **kwargs):
        super().__init__(name, sources, **kwargs)
        self.cuda_sources, self.nvcc = cuda_sources, nvcc


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._fail(exc)

    def build_extension(self, ext):
        try:
            if isinstance(ext, NvccExtension):
                ext.extra_objects = self._compile_cuda(ext)
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _compile_cuda(self, ext):
        """nvcc -c each of ext.cuda_sources into build_temp; returns the object files."""
        objects = []
        for source in ext.cuda_sources:
            obj = os.path.join(self.build_temp, "cuda", os.path.splitext(source)[0] + ".o")
            objects.append(obj)
            inputs = [source, *ext.depends]
            if not self.force and os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(f)
                                                              for f in inputs):
                continue
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [ext.nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-lineinfo",
                   "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", *nvcc_arch_flags(),
                   *(f"-I{d}" for d in ext.include_dirs)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        return objects

    @staticmethod
    def _fail(exc):
        if REQUIRED:
            raise exc
        sys.stderr.write(
            "\n*** kvfast: building the native extension failed; falling back to the pure-Python path "
            f"(slower loads). Cause: {exc}\n\n"
        )


ext_modules = []
if Pybind11Extension is not None:
    ext_modules.append(
        Pybind11Extension(
            "kvfast._C",
            sorted(glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=["-O3", "-pthread"],
            extra_link_args=["-pthread"],  # the loader's worker threads (std::thread)
        )
    )
    ext_modules.append(
        Pybind11Extension(
            "kvfast._C_cuda_host",
            ["csrc/cuda/host_emulation.cpp", "csrc/cuda/sink_plan.cpp", "csrc/load_plan.cpp"],
            depends=sorted(glob("csrc/cuda/*.h")),
            include_dirs=["csrc/cuda", "csrc"],
            cxx_std=17,
            # The emulated kernels copy tensors' bytes through word types, as the device code does.
            extra_compile_args=["-O2", "-fno-strict-aliasing"],
        )
    )
elif REQUIRED:
    raise RuntimeError("pybind11 is required to build kvfast._C")

NVCC = find_nvcc()
if NVCC is None and REQUIRE == "cuda":
    raise RuntimeError("KVFAST_REQUIRE_NATIVE=cuda, but nvcc was found neither in CUDA_HOME/bin, CUDA_PATH/bin nor on "
                       "PATH, so kvfast._C_cuda cannot be built: install the CUDA toolkit or set CUDA_HOME to it")
if NVCC is None and REQUIRED:
    sys.stderr.write("\n*** kvfast: nvcc not found: kvfast._C_cuda (the CUDA load path and kernels) is not built; "
                     "KVFAST_REQUIRE_NATIVE=cuda makes this an error\n\n")
# One line in the build log saying what is built (pip shows it with -v; CI checks it).
if Pybind11Extension is None:
    print("kvfast build: pybind11 not found: no native extension (pure-Python path only)", flush=True)
elif NVCC is None:
    print("kvfast build: kvfast._C (host loader); CUDA part off: no nvcc in CUDA_HOME/bin, CUDA_PATH/bin or PATH",
          flush=True)
else:
    print(f"kvfast build: kvfast._C (host loader) and kvfast._C_cuda (CUDA part on: {NVCC})", flush=True)
if Pybind11Extension is not None and NVCC is not None:
    try:
        cuda_includes, cuda_libraries = cuda_toolkit_dirs(NVCC)
    except OSError as exc:  # an nvcc that cannot run: the build of _C_cuda then fails (fatal if required)
        cuda_includes, cuda_libraries = [], []
        sys.stderr.write(f"\n*** kvfast: {NVCC} --dryrun failed ({exc})\n\n")
    ext_modules.append(
        NvccExtension(
            "kvfast._C_cuda",
            # The GPU load job is kvfast._C's LoadJob with a CUDA sink: the host loader's sources are built in.
            [*(f"csrc/cuda/{name}.cpp" for name in ("bindings", "gpu_sink", "sink_plan", "staging_pool")),
             *(f"csrc/{name}.cpp" for name in ("paged_loader", "file_source", "crc32c", "stream_copy", "load_plan"))],
            cuda_sources=sorted(glob("csrc/cuda/*.cu")),
            nvcc=NVCC,
            # Any change under csrc/cuda/ (kernels, header) rebuilds the objects and relinks the module.
            depends=sorted(glob("csrc/cuda/*.h") + glob("csrc/cuda/*.cu")),
            include_dirs=["csrc/cuda", "csrc", *cuda_includes],
            library_dirs=cuda_libraries,
            # The static runtime: importing needs no libcudart.so, and the CUDA torch brings its own runtime
            # anyway; both drive the same device contexts through the driver.
            libraries=["cudart_static", "dl", "rt", "pthread"],
            cxx_std=17,
            extra_compile_args=["-O3", "-pthread"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
