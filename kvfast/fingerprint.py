"""Identity: which model made a KV cache, and which document it holds.

Both are SHA-256 over canonical bytes, so they are equal across processes, restarts and machines (Python's
``hash`` is salted per process; a cache keyed by it loses every hit after a restart).
"""
from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvfast.format import dtype_name, token_bytes

# Config fields that change what K and V are (besides the weights). Missing ones are recorded as null.
KV_CONFIG_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "max_position_embeddings",
    "attention_bias",
    "qk_norm",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
    "vocab_size",
)


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a transformers config."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return config.num_hidden_layers, num_kv_heads, head_dim


def model_config(model: torch.nn.Module) -> dict[str, Any]:
    """The model's KV-shaping config fields, architecture and dtype, as plain JSON values."""
    config = model.config
    layers, kv_heads, head_dim = kv_shape(config)
    out: dict[str, Any] = {
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": dtype_name(model.dtype),
    }
    for name in KV_CONFIG_FIELDS:
        out[name] = _plain(getattr(config, name, None))
    return out


def _plain(value: Any) -> Any:
    """A JSON-safe, deterministic rendering of a config value."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# Weight digests are cached per model object, keyed by each parameter's (data_ptr, _version) -- which change
# when it is replaced or modified in place through autograd-visible ops -- and a sample of its bytes, which
# catches most edits through ``p.data``. An edit of single elements through ``p.data`` between samples is not
# seen: call ``fingerprint(model, refresh=True)`` after such surgery.
_PROBE = 4096
_weights_cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _probe(p: torch.Tensor) -> bytes:
    """Bytes of up to ``_PROBE`` evenly spaced elements of ``p``, its last included."""
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // _PROBE)
    return torch.cat([flat[::step], flat[-1:]]).to("cpu").contiguous().view(torch.uint8).numpy().tobytes()


def weights_digest(model: torch.nn.Module, *, refresh: bool = False) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (tied parameters counted once)."""
    params = sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0])
    # An edit through p.data bumps no version counter, so a strided sample of the bytes is part of the key too.
    state = tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape), _probe(p)) for name, p in params)
    cached = _weights_cache.get(model)
    if cached is not None and cached[0] == state and not refresh:
        return cached[1]
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}\0{_dtype_str(p.dtype)}\0{tuple(p.shape)}\0".encode())
        h.update(memoryview(p.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()))
    digest = h.hexdigest()
    _weights_cache[model] = (state, digest)
    return digest


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fingerprint(model: torch.nn.Module, *, refresh: bool = False) -> str:
    """The model fingerprint: ``"sha256:<hex>"`` over its KV-shaping config, dtype and weights.

    Two checkpoints with the same config but other weights get different fingerprints; so does the same
    checkpoint in another dtype. Computed once per model object and cached until a parameter changes
    (``refresh=True`` recomputes; see the note on ``_PROBE`` for edits through ``p.data``).

    Example:
        >>> fp = kvfast.fingerprint(model)  # doctest: +SKIP
        >>> fp[:7]
        'sha256:'
    """
    statement = json.dumps({"config": model_config(model), "weights": weights_digest(model, refresh=refresh)},
                           sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(statement.encode()).hexdigest()


def block_hashes(token_ids: Sequence[int] | np.ndarray | torch.Tensor, block_tokens: int = 16) -> list[str]:
    """Hash chain over full token blocks: ``h_i = SHA-256(h_{i-1} || tokens of block i)``, ``h_{-1} = ""``.

    Entry ``i`` identifies the prefix of ``(i + 1) * block_tokens`` tokens, so a store finds the longest
    stored prefix of a prompt by walking the prompt's chain (as vLLM's prefix caching does). A trailing
    partial block gets no hash.
    """
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    raw = token_bytes(token_ids)
    step = 4 * block_tokens
    out: list[str] = []
    prev = b""
    for i in range(0, len(raw) - step + 1, step):
        prev = hashlib.sha256(prev + raw[i : i + step]).digest()
        out.append(prev.hex())
    return out


def document_key(token_ids: Sequence[int] | np.ndarray | torch.Tensor, block_tokens: int = 16) -> str:
    """The key of a whole document: the hash chain extended by its trailing partial block and its length."""
    raw = token_bytes(token_ids)
    chain = block_hashes(token_ids, block_tokens)
    tail = raw[len(chain) * 4 * block_tokens :]
    last = bytes.fromhex(chain[-1]) if chain else b""
    n = (len(raw) // 4).to_bytes(8, "little")
    return hashlib.sha256(last + tail + n).hexdigest()
