"""bench/gpu_check.sh's gate, right after the build: is this run going to test and measure the GPU at all?

    python3 bench/gpu_gate.py             # exit 1 unless every check below passes
    python3 bench/gpu_gate.py --dry-run   # the imports only (what a machine without a device can check)

Checks, in order, each printed: kvfast and kvfast._C_cuda import (a build without nvcc leaves the second out, and
every CUDA test would then skip and look green); the CUDA runtime and driver see a device, and so does torch; the
CUDA kernels run a tiny scatter and gather on it bit for bit (a driver older than the runtime fails here, not in
the middle of the tests); which kernels and load path kvfast will use.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check the imports only")
    args = parser.parse_args(argv)

    import torch

    import kvfast
    from kvfast import _backend

    print(f"kvfast backends: {kvfast.backend()}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices seen by torch: {torch.cuda.device_count()}")
    try:
        from kvfast import _C_cuda
    except ImportError as exc:
        print(f"FAIL kvfast._C_cuda does not import ({exc}): rebuild with KVFAST_REQUIRE_NATIVE=cuda")
        return 0 if args.dry_run else 1
    print(f"kvfast._C_cuda: runtime {_C_cuda.runtime_version()}, driver {_C_cuda.driver_version()}, "
          f"devices {_C_cuda.device_count()}")
    if args.dry_run:
        print("dry run: no device checks")
        return 0

    failures = []
    if _C_cuda.device_count() < 1:
        failures.append("kvfast._C_cuda sees no device (driver missing, or older than the runtime?)")
    if not torch.cuda.is_available():
        failures.append("torch sees no CUDA device")
    if not failures:
        from kvfast.kernels import cuda as cuda_kernels

        print(f"device 0: {torch.cuda.get_device_name(0)}, compute capability {torch.cuda.get_device_capability(0)}")
        try:
            _backend._probe(cuda_kernels, "cuda:0")
            print("the CUDA kernels ran a scatter and a gather on cuda:0, bit for bit")
        except Exception as exc:  # noqa: BLE001 - reported, then the gate fails
            failures.append(f"the CUDA kernels cannot run on cuda:0: {type(exc).__name__}: {exc}")
        name, _ = _backend.paged_kernels("cuda")
        print(f"kvfast's paged-cache kernels on cuda:0: {name}")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
