"""Identity: which model made a KV cache, and which document it holds.

Both are SHA-256 over canonical bytes, so they are equal across processes, restarts and machines (Python's
``hash`` is salted per process; a cache keyed by it loses every hit after a restart).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvfast.errors import KvfastError
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
_PROBE = 512
_weights_cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]] = weakref.WeakKeyDictionary()


def _probes(params: list[tuple[str, torch.Tensor]]) -> tuple[bytes, ...]:
    """Up to ``_PROBE`` evenly spaced elements of each parameter, its last included: their bytes, concatenated per
    (device, dtype), so that a check costs one gather and one copy to the host per group rather than per
    parameter (on a GPU, one sync instead of one per parameter). 512 elements keep a cached check cheap
    (bench/bench_store.py times it); any rewrite of a whole tensor still changes them."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for _, p in params:
        flat = p.detach().reshape(-1)
        groups.setdefault((p.device, p.dtype), []).extend([flat[:: max(1, flat.numel() // _PROBE)], flat[-1:]])
    return tuple(torch.cat(parts).to("cpu").view(torch.uint8).numpy().tobytes() for parts in groups.values())


def weights_digest(model: torch.nn.Module, *, refresh: bool = False) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes (tied parameters counted once)."""
    params = sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0])
    # An edit through p.data bumps no version counter, so a strided sample of the bytes is part of the key too.
    state = (tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape)) for name, p in params), _probes(params))
    cached = _weights_cache.get(model)
    if cached is not None and cached[0] == state and not refresh:
        return cached[1]
    digest = _tensors_digest(params)
    _weights_cache[model] = (state, digest)
    return digest


def _tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``(name, dtype, shape, bytes)`` of each tensor, in the order given (sorted by name)."""
    h = hashlib.sha256()
    for name, p in named:
        h.update(f"{name}\0{_dtype_str(p.dtype)}\0{tuple(p.shape)}\0".encode())
        h.update(memoryview(p.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


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
    return _fingerprint_of(model_config(model), weights_digest(model, refresh=refresh))


def _fingerprint_of(config: dict[str, Any], weights: str) -> str:
    statement = json.dumps({"config": config, "weights": weights}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(statement.encode()).hexdigest()


def checkpoint_fingerprint(model_dir: str | os.PathLike, *, dtype: torch.dtype) -> str:
    """:func:`fingerprint` of the model a transformers checkpoint folder loads as, without loading the model.

    For serving stacks that run their own implementation of the model (vLLM's scheduler holds no
    ``transformers`` model at all) yet must find documents that ``kvfast publish`` made: the result equals
    ``fingerprint(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype))``. The module tree is built on
    the meta device (no memory: it only gives the parameter names, shapes and weight tying) and each parameter is
    read from the folder's ``*.safetensors`` files and cast to ``dtype``, as ``from_pretrained`` casts it.

    Args:
        model_dir: a local checkpoint folder (``config.json`` and ``*.safetensors``).
        dtype: the dtype the model is served in (the KV's dtype).

    Raises:
        KvfastError: the folder has no safetensors weights, or lacks a parameter the model has, or holds one
            of another shape (the message names the folder and the parameter).

    Example:
        >>> kvfast.checkpoint_fingerprint("models/tiny", dtype=torch.bfloat16)  # doctest: +SKIP
        'sha256:...'
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KvfastError("no *.safetensors weights in the folder (kvfast reads safetensors checkpoints only)",
                          path=folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(f, framework="pt")) for f in files]
        where = {name: h for h in handles for name in h.keys()}

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for name, p in sorted(skeleton.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
                if name not in where:
                    raise KvfastError(f"parameter {name} is in no *.safetensors file of the folder", path=folder)
                t = where[name].get_tensor(name)
                if tuple(t.shape) != tuple(p.shape):
                    raise KvfastError(f"parameter {name} has shape {tuple(t.shape)}, the config gives "
                                      f"{tuple(p.shape)}", path=folder)
                yield name, t.to(dtype)

        weights = _tensors_digest(tensors())
    return _fingerprint_of(model_config(skeleton), weights)


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
