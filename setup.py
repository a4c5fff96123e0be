"""Builds kvfast._C, the optional native extension (pybind11).

The extension is optional when installing: without a C++ toolchain kvfast falls back, loudly, to its
pure-Python reference path. CI sets KVFAST_REQUIRE_NATIVE=1 so a broken build fails instead.
"""
import os
import sys
from glob import glob

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # only without build isolation and without pybind11
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._fail(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    @staticmethod
    def _fail(exc):
        if os.environ.get("KVFAST_REQUIRE_NATIVE") == "1":
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
            extra_compile_args=["-O3"],
        )
    )
elif os.environ.get("KVFAST_REQUIRE_NATIVE") == "1":
    raise RuntimeError("pybind11 is required to build kvfast._C")

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
