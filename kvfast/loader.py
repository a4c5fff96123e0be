"""File -> staging -> paged cache: attach a .kvf document to a sequence of a :class:`PagedKVCache`.

This is the pure-Python reference path (pread into a staging buffer, checksum, scatter). Every check that
can refuse a file runs before the first block is allocated, and a failure while copying frees what was
allocated: a failed load leaves the cache as it was.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvfast.errors import DtypeMismatchError, ModelMismatchError, ShapeMismatchError, TokenMismatchError
from kvfast.fingerprint import fingerprint as model_fingerprint
from kvfast.fingerprint import model_config
from kvfast.format import DTYPE_NAMES, KvfReader, open_kvf
from kvfast.paged import KVSequence, PagedKVCache


def load(
    path: str | os.PathLike | KvfReader,
    cache: PagedKVCache,
    *,
    model: Any | None = None,
    fingerprint: str | None = None,
    num_tokens: int | None = None,
    token_ids: Sequence[int] | torch.Tensor | None = None,
    verify: bool = True,
) -> KVSequence:
    """Load a document's KV from a .kvf file into new blocks of ``cache`` and return its sequence.

    Args:
        path: the .kvf file (or an open :class:`KvfReader`).
        cache: the paged cache to fill; its layers, KV heads, head_dim and dtype must match the file.
        model: the model that will continue from this KV; its fingerprint must equal the file's.
        fingerprint: instead of ``model``, the expected fingerprint (one of the two is required).
        num_tokens: load only the first ``num_tokens`` tokens (a prefix); default all.
        token_ids: when given, the token ids the caller expects the loaded prefix to be; a difference raises
            :class:`TokenMismatchError` naming the first differing position.
        verify: check every chunk's checksum (turn off only for sources you trust).

    Returns:
        A new :class:`KVSequence` holding ``num_tokens`` tokens. Free it with ``cache.free(seq)``.

    Raises:
        FormatError (and subclasses): the file is invalid or corrupted.
        ModelMismatchError, DtypeMismatchError, ShapeMismatchError: the file is for another model or cache.
        TokenMismatchError: ``token_ids`` differ from the file's.
        CacheFullError: not enough free blocks.

    Example:
        >>> cache = kvfast.PagedKVCache.for_model(model, num_blocks=1024)  # doctest: +SKIP
        >>> seq = kvfast.load("doc.kvf", cache, model=model)                # doctest: +SKIP
    """
    if model is None and fingerprint is None:
        raise TypeError("kvfast.load needs model= or fingerprint= to check the file was made by that model")
    reader = path if isinstance(path, KvfReader) else open_kvf(path)
    try:
        n = _check(reader, cache, model, fingerprint, num_tokens, token_ids)
        seq = cache.new_sequence()
        slots = cache.append_slots(seq, n)
        try:
            _copy(reader, cache, slots, n, verify)
        except BaseException:
            cache.free(seq)
            raise
        return seq
    finally:
        if reader is not path:
            reader.close()


def _check(reader: KvfReader, cache: PagedKVCache, model: Any | None, fingerprint: str | None,
           num_tokens: int | None, token_ids: Sequence[int] | torch.Tensor | None) -> int:
    m, where = reader.manifest, reader.path
    if model is not None and model.dtype != m.dtype:
        raise DtypeMismatchError(f"KV is {DTYPE_NAMES[m.dtype]} but the model runs in {model.dtype}; publish "
                                 "the document with the model in the dtype you serve", path=where)
    if m.dtype != cache.dtype:
        raise DtypeMismatchError(f"KV is {DTYPE_NAMES[m.dtype]} but the paged cache is {cache.dtype}; create the "
                                 "cache with the file's dtype or re-publish in the model's dtype", path=where)
    ours = (cache.num_layers, cache.num_kv_heads, cache.head_dim)
    theirs = (m.num_layers, m.num_kv_heads, m.head_dim)
    if ours != theirs:
        raise ShapeMismatchError(f"KV has (layers, kv_heads, head_dim) = {theirs}, the paged cache {ours}",
                                 path=where)
    expected = fingerprint if fingerprint is not None else model_fingerprint(model)
    if m.fingerprint != expected:
        raise ModelMismatchError(_mismatch_message(m.fingerprint, expected, m.config, model), path=where)
    n = m.num_tokens if num_tokens is None else num_tokens
    if not 1 <= n <= m.num_tokens:
        raise ValueError(f"num_tokens must be in [1, {m.num_tokens}], got {n}")
    if token_ids is not None:
        want = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        if want.numel() != n:
            raise TokenMismatchError(f"expected {want.numel()} token ids but loading {n} tokens", path=where)
        diff = (want != reader.token_ids[:n]).nonzero()
        if diff.numel():
            i = int(diff[0])
            raise TokenMismatchError(f"token ids differ at position {i}: file has {int(reader.token_ids[i])}, "
                                     f"caller expects {int(want[i])}", path=where)
    return n


def _mismatch_message(theirs: str, ours: str, config: Any, model: Any | None) -> str:
    msg = f"KV was made by model {theirs[:19]}..., not by this one ({ours[:19]}...)"
    if model is None:
        return msg
    mine = model_config(model)
    changed = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
    if changed:
        return f"{msg}; config fields that differ: {', '.join(changed)}"
    return f"{msg}; same config but other weights: publish the document again with this checkpoint"


def _copy(reader: KvfReader, cache: PagedKVCache, slots: torch.Tensor, n: int, verify: bool) -> None:
    staging = np.empty(max(c.raw_length for c in reader.chunks), dtype=np.uint8)
    for chunk in reader.chunks:
        if chunk.start >= n:
            continue
        data = reader.read_chunk(chunk, staging[: chunk.raw_length], verify=verify)
        k, v = reader.split_chunk(chunk, data)
        stop = min(chunk.stop, n)
        t = stop - chunk.start
        cache.write(chunk.layer, slots[chunk.start : stop], k[:t].to(cache.device), v[:t].to(cache.device))
