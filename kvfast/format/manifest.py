"""§3 of docs/FORMAT.md: the manifest's JSON parsed and validated field by field, on read and on write."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kvfast.errors import ManifestError, UnsupportedCodecError
from kvfast.format.spec import (
    CHECKSUMS,
    CODECS,
    DTYPES,
    MAX_CHUNK_BYTES,
    MAX_CHUNK_TOKENS,
    MAX_HEAD_DIM,
    MAX_KV_HEADS,
    MAX_LAYERS,
    MAX_TOKENS,
    Manifest,
)


def parse_json(raw: bytes, path: Path) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ManifestError(f"manifest has a duplicated key among {sorted(keys)}", path=path)
        return dict(pairs)

    def no_constants(name: str) -> Any:
        raise ManifestError(f"manifest contains {name}, which JSON does not allow", path=path)

    def finite(literal: str) -> float:
        # json reads 1e400 as inf, which §3 forbids and canonical JSON (signing) cannot write back
        value = float(literal)
        if not math.isfinite(value):
            raise ManifestError(f"manifest number {literal[:40]} overflows a double, which JSON does not allow",
                                path=path)
        return value

    try:
        body = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants,
                          parse_float=finite)
    except ManifestError:  # from the hooks above; a ValueError too, so it must pass before the next clause
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, and int()
        # refusing a literal longer than sys.get_int_max_str_digits() (4300 digits by default)
        raise ManifestError(f"manifest is not valid UTF-8 JSON: {exc}", path=path) from None
    if not isinstance(body, dict):
        raise ManifestError("manifest must be a JSON object", path=path)
    _no_surrogates(body, path)
    return body


def _no_surrogates(body: dict[str, Any], path: Path) -> None:
    """Refuse a string holding a lone surrogate (JSON's ``\\ud800`` escape): valid JSON, but not Unicode text, so
    encoding it later (a store path, ``kvfast inspect``, a signed statement) would fail far from the file."""
    stack: list[tuple[str, Any]] = [("", body)]  # iterative: nesting as deep as json.loads allows
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode()  # a message must itself encode
                inner = f"{where}.{name}" if where else name
                stack += [(f"{inner} (its key)", key), (inner, item)]
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ManifestError(f"manifest field {where[:200]} holds a lone surrogate (a \\ud800-\\udfff "
                                    "escape), which is not Unicode text", path=path) from None


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"manifest field {where}{key} is missing", path=path)
    value = obj[key]
    # bool is an int in Python; a manifest that says `true` for a count is malformed
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ManifestError(f"manifest field {where}{key} has type {type(value).__name__}, expected "
                            f"{'/'.join(t.__name__ for t in _as_tuple(kind))}", path=path)
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _int_field(obj: Any, key: str, lo: int, hi: int, path: Path, where: str = "") -> int:
    value = _field(obj, key, int, path, where)
    if not lo <= value <= hi:
        raise ManifestError(f"manifest field {where}{key} = {value} is outside [{lo}, {hi}]", path=path)
    return value


def manifest_from_json(body: dict[str, Any], path: Path) -> tuple[Manifest, dict[str, int], list[list[int]]]:
    model = _field(body, "model", dict, path, "")
    kv = _field(body, "kv", dict, path, "")
    tokens = _field(body, "tokens", dict, path, "")
    dtype = _field(kv, "dtype", str, path, "kv.")
    if dtype not in DTYPES:
        raise ManifestError(f"kv.dtype {dtype!r} is not one of {sorted(DTYPES)}", path=path)
    codec = _field(body, "codec", str, path, "")
    if codec not in CODECS:
        raise UnsupportedCodecError(f"codec {codec!r} is not supported by this kvfast (knows {list(CODECS)}); "
                                    "upgrade kvfast", path=path)
    checksum = _field(body, "checksum", str, path, "")
    if checksum not in CHECKSUMS:
        raise ManifestError(f"checksum {checksum!r} is not one of {list(CHECKSUMS)}", path=path)
    tokenizer = body.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise ManifestError("manifest field tokenizer must be a string or null", path=path)
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ManifestError("manifest field metadata must map strings to strings", path=path)
    sha = _field(tokens, "sha256", str, path, "tokens.")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError("tokens.sha256 must be 64 lowercase hex digits", path=path)
    manifest = Manifest(
        fingerprint=_field(model, "fingerprint", str, path, "model."),
        config=_field(model, "config", dict, path, "model."),
        tokenizer=tokenizer,
        num_layers=_int_field(kv, "num_layers", 1, MAX_LAYERS, path, "kv."),
        num_kv_heads=_int_field(kv, "num_kv_heads", 1, MAX_KV_HEADS, path, "kv."),
        head_dim=_int_field(kv, "head_dim", 1, MAX_HEAD_DIM, path, "kv."),
        dtype=DTYPES[dtype],
        num_tokens=_int_field(tokens, "count", 1, MAX_TOKENS, path, "tokens."),
        token_sha256=sha,
        codec=codec,
        checksum=checksum,
        chunk_tokens=_int_field(body, "chunk_tokens", 1, MAX_CHUNK_TOKENS, path),
        metadata=metadata,
    )
    token_region = {
        "offset": _int_field(tokens, "offset", 0, 1 << 62, path, "tokens."),
        "length": _int_field(tokens, "length", 0, 1 << 62, path, "tokens."),
        "crc32c": _int_field(tokens, "crc32c", 0, 0xFFFFFFFF, path, "tokens."),
    }
    raw_chunks = _field(body, "chunks", list, path, "")
    limits = ((0, 1 << 62), (0, 1 << 62), (0, 1 << 62), (0, 0xFFFFFFFF))
    for i, c in enumerate(raw_chunks):
        if (not isinstance(c, list) or len(c) != 4
                or not all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi
                           for x, (lo, hi) in zip(c, limits))):
            raise ManifestError(f"chunks[{i}] must be [offset, length, raw_length, crc32c] of non-negative "
                                f"integers in range, got {str(c)[:80]}", path=path)
    return manifest, token_region, raw_chunks


def validate_manifest(m: Manifest, path: Path) -> None:
    """The writer's side of §3: refuse to write what the reader would refuse to read."""
    if not (1 <= m.num_kv_heads <= MAX_KV_HEADS and 1 <= m.head_dim <= MAX_HEAD_DIM
            and 1 <= m.num_tokens <= MAX_TOKENS):
        raise ValueError(f"{path}: KV shape out of the format's limits (§3)")
    if 2 * min(m.chunk_tokens, m.num_tokens) * m.token_row_bytes > MAX_CHUNK_BYTES:
        raise ValueError(f"{path}: chunks of {m.chunk_tokens} tokens x {m.token_row_bytes}-byte rows exceed the "
                         f"{MAX_CHUNK_BYTES}-byte chunk limit (§6); use a smaller chunk_tokens")
    if not isinstance(m.fingerprint, str):
        raise ValueError(f"fingerprint must be a string (kvfast.fingerprint(model)), got {m.fingerprint!r}")
    if m.tokenizer is not None and not isinstance(m.tokenizer, str):
        raise ValueError(f"tokenizer must be a string or None, got {m.tokenizer!r}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.metadata.items()):
        raise ValueError("metadata must map strings to strings")
    json.dumps(m.to_json(), allow_nan=False)  # config must be plain JSON
