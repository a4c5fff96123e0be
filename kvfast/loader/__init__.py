"""File → staging → pages: the one compatibility check (compat), the native and reference copy jobs (native,
reference), the handle of a load in progress (handle), and the calls (api): ``load_into`` fills pages the caller
owns, ``load`` and ``load_async`` allocate a sequence and then ``load_into``."""
from kvfast.loader.api import choose_path, load, load_async, load_into
from kvfast.loader.handle import LoadHandle

__all__ = ["LoadHandle", "choose_path", "load", "load_async", "load_into"]
