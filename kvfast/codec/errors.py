"""The codec's exception: encoded bytes that no encoder could have written."""
from __future__ import annotations

from kvfast.errors import FormatError


class CodecError(FormatError):
    """A chunk's encoded bytes are inconsistent (a size, a code table or a bit stream): the file is damaged or
    was not written by kvfast. Re-publish it or fetch it again."""
