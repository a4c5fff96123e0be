"""Type stubs for kvfast._C, the native extension built from csrc/."""

from typing_extensions import Buffer

def crc32c(data: Buffer, value: int = 0) -> int:
    """CRC-32C of a contiguous buffer, continuing from ``value`` (0 to start). Releases the GIL."""

def crc32c_impl() -> str:
    """Which CRC-32C implementation runs: ``"sse4.2"`` or ``"software"``."""
