"""Does this KV fit these pages, for this model and these tokens? The one check, used by every load, by the store
and by the vLLM connector, with one exception class per reason (kvfast.errors)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvfast.errors import (
    DtypeMismatchError,
    InvalidArgumentError,
    ModelMismatchError,
    ShapeMismatchError,
    TokenMismatchError,
)
from kvfast.format import DTYPE_NAMES, KvfReader
from kvfast.identity import fingerprint as model_fingerprint
from kvfast.identity import model_config


def check_fits(kv_shape: tuple[int, int, int], kv_dtype: torch.dtype, pages_shape: tuple[int, int, int],
               pages_dtype: torch.dtype, *, model: Any | None = None, path: Any = None) -> None:
    """Refuse KV of ``kv_shape`` = (layers, kv_heads, head_dim) and ``kv_dtype`` for pages of another shape or dtype,
    or for a ``model`` running in another dtype (kvfast never converts KV).

    Raises:
        DtypeMismatchError, ShapeMismatchError: naming ``path`` and both sides.
    """
    name = DTYPE_NAMES.get(kv_dtype, str(kv_dtype))
    if model is not None and not isinstance(model, str) and model.dtype != kv_dtype:
        raise DtypeMismatchError(f"KV is {name} but the model runs in {model.dtype}; publish the document with "
                                 "the model in the dtype you serve", path=path)
    if pages_dtype != kv_dtype:
        raise DtypeMismatchError(f"KV is {name} but the paged cache is {pages_dtype}; create the cache with the "
                                 "file's dtype or re-publish in the model's dtype", path=path)
    if tuple(pages_shape) != tuple(kv_shape):
        raise ShapeMismatchError(f"KV has (layers, kv_heads, head_dim) = {tuple(kv_shape)}, the paged cache "
                                 f"{tuple(pages_shape)}", path=path)


def check_file(reader: KvfReader, pages_shape: tuple[int, int, int], pages_dtype: torch.dtype, *,
               model: Any | None = None, fingerprint: str | None = None, num_tokens: int | None = None,
               token_ids: Sequence[int] | torch.Tensor | None = None) -> int:
    """Every check a load runs before it writes a byte: shape and dtype (:func:`check_fits`), the model that made
    the file (``model`` or its ``fingerprint``), the prefix length and the expected token ids.

    Returns:
        How many tokens to load (``num_tokens``, default the whole file).

    Raises:
        InvalidArgumentError: neither ``model`` nor ``fingerprint`` given, or ``num_tokens`` outside
            ``[1, tokens in the file]``.
        DtypeMismatchError, ShapeMismatchError, ModelMismatchError, TokenMismatchError: naming the file.
    """
    m, where = reader.manifest, reader.path
    if model is None and fingerprint is None:
        raise InvalidArgumentError("loading needs model= or fingerprint= to check the file was made by that model",
                                   path=where)
    check_fits((m.num_layers, m.num_kv_heads, m.head_dim), m.dtype, pages_shape, pages_dtype, model=model,
               path=where)
    expected = fingerprint if fingerprint is not None else model_fingerprint(model)
    if m.fingerprint != expected:
        raise ModelMismatchError(_mismatch_message(m.fingerprint, expected, m.config, model), path=where)
    n = m.num_tokens if num_tokens is None else num_tokens
    if not 1 <= n <= m.num_tokens:
        raise InvalidArgumentError(f"num_tokens={n} is not a prefix of the file's {m.num_tokens} tokens; use "
                                   f"1..{m.num_tokens}", path=where)
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


def _mismatch_message(theirs: str, ours: str, config: Mapping[str, Any], model: Any | None) -> str:
    msg = f"KV was made by model {theirs[:19]}..., not by this one ({ours[:19]}...)"
    if model is None:
        return msg
    mine = model_config(model)
    changed = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
    if changed:
        return f"{msg}; config fields that differ: {', '.join(changed)}"
    return f"{msg}; same config but other weights: publish the document again with this checkpoint"
