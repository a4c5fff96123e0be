"""The one place that decides which implementation runs: the native extension or the Python reference."""
from __future__ import annotations

import warnings

try:
    from kvfast import _C as native
except ImportError as exc:  # built without a C++ toolchain: correct, but slower
    native = None
    warnings.warn(
        f"kvfast: the native extension kvfast._C is not available ({exc}); using the pure-Python path",
        RuntimeWarning,
        stacklevel=2,
    )


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of a contiguous buffer (bytes, memoryview, numpy array), continuing from ``value``."""
    if native is not None:
        return native.crc32c(data, value)
    import crc32c as _crc32c_pkg

    return _crc32c_pkg.crc32c(data, value)


def backend() -> dict[str, str]:
    """Which implementations kvfast uses on this machine, e.g. ``{"io": "native", "crc32c": "sse4.2"}``."""
    if native is None:
        return {"io": "python", "crc32c": "crc32c-package"}
    return {"io": "native", "crc32c": native.crc32c_impl()}
