"""File → staging → pages: the one compatibility check, the native and reference copy jobs, ``load_into`` (pages the
caller owns), ``load`` (allocate, then ``load_into``) and the asynchronous handle."""
from kvfast.load.loader import LoadHandle, load, load_async

__all__ = ["LoadHandle", "load", "load_async"]
