"""Named model configs, and models with random weights built cheaply from them (for benchmarks and costs).

Timing a forward pass does not depend on trained weights, only on shapes and dtype, so ``kvfast bench
qwen3-4b`` builds the model from the public config values below with fixed-seed random weights instead of
downloading 8 GB. The configs are the public ``config.json`` values of the Hugging Face checkpoints
(``Qwen/Qwen3-0.6B``, ``Qwen/Qwen3-4B``); their parameter counts match the model cards (0.6B with 0.44B
non-embedding, 4.0B with 3.6B non-embedding), which ``tests/test_bench.py`` checks.

Building is cheap: the module tree is made on the ``meta`` device (no memory, no init), storage is allocated
once with ``to_empty``, and the weights are filled from one pool of seeded normal values (a copy per
parameter, not a random draw per element), so a 0.6B model is ready in about a second.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

# name -> (transformers config class name, config.json values). Keep in step with the public checkpoints.
NAMED_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=False,
        tie_word_embeddings=True, use_sliding_window=False, max_window_layers=28, bos_token_id=151643,
        eos_token_id=151645)),
    "qwen3-4b": ("Qwen3Config", dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0, attention_bias=False,
        tie_word_embeddings=True, use_sliding_window=False, max_window_layers=36, bos_token_id=151643,
        eos_token_id=151645)),
}
ALIASES = {"qwen/qwen3-0.6b": "qwen3-0.6b", "qwen/qwen3-4b": "qwen3-4b"}

INIT_STD = 0.02  # transformers' usual initializer_range
_POOL = (1 << 22) + 1  # values in the seeded pool; odd, so consecutive rows of a weight do not repeat in step


def named(name: str) -> str | None:
    """The registry key for ``name`` (case-insensitive, ``Qwen/Qwen3-4B`` style accepted), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in NAMED_CONFIGS else None


def get_config(name_or_path: str | os.PathLike) -> Any:
    """A ``transformers`` config: a named one (see :data:`NAMED_CONFIGS`), a model folder or a config.json.

    Raises:
        ValueError: neither a known name nor an existing folder / file.
    """
    import transformers

    key = named(str(name_or_path))
    if key is not None:
        cls_name, values = NAMED_CONFIGS[key]
        return getattr(transformers, cls_name)(**values)
    path = Path(name_or_path)
    if path.is_dir() or path.is_file():
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    raise ValueError(f"{name_or_path}: not a model folder, a config.json, or a named config "
                     f"(one of {', '.join(NAMED_CONFIGS)})")


def _has_weights(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def load_model(name_or_path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A causal LM in eval mode: a checkpoint folder's trained weights, else random weights from its config.

    Args:
        name_or_path: a named config (``"qwen3-0.6b"``), a model folder, or a config.json.
        dtype, device: of the weights (the KV has this dtype).
        seed: of the random weights (ignored for a folder with weights).
        attn_implementation: ``"sdpa"`` (transformers' default on CPU and GPU) or ``"eager"``.
    """
    path = Path(name_or_path)
    if named(str(name_or_path)) is None and _has_weights(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                    attn_implementation=attn_implementation).to(device).eval()
    return build_model(get_config(name_or_path), dtype=dtype, device=device, seed=seed,
                       attn_implementation=attn_implementation)


@torch.no_grad()
def build_model(config: Any, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                seed: int = 0, attn_implementation: str = "sdpa") -> Any:
    """A causal LM of ``config`` with fixed-seed random weights, built without per-element initialisation.

    Matrices get ``N(0, INIT_STD)`` values (drawn once into a pool and copied), biases 0, norm weights 1, so
    activations stay finite through deep stacks. Rotary tables are computed in float32 on ``device``, as
    ``from_pretrained(dtype=...)`` leaves them (``model.to(bf16)`` would round them).

    Example:
        >>> model = build_model(get_config("qwen3-0.6b"), device="meta")  # shapes only, instant
        >>> round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
        0.6
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model = model.to(dtype)
    if device.type == "meta":
        return model.eval()
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage; share it again
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL, generator=g).mul_(INIT_STD).to(device=device, dtype=dtype)
    offsets = torch.randint(0, _POOL, (1 << 16,), generator=g).tolist()
    for i, (name, p) in enumerate(sorted(model.named_parameters(remove_duplicate=True))):
        if p.ndim >= 2:
            _fill_from_pool(p, pool, offsets[i % len(offsets)])
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    _reset_rotary(model, device)
    return model.eval()


def _fill_from_pool(p: torch.Tensor, pool: torch.Tensor, start: int) -> None:
    """Copy ``pool`` (cyclically, from ``start``) into every element of ``p``."""
    flat = p.view(-1)
    done, n = 0, flat.numel()
    while done < n:
        take = min(n - done, pool.numel() - start)
        flat[done : done + take].copy_(pool[start : start + take])
        done, start = done + take, 0


def _reset_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Recompute the non-persistent rotary buffers that ``to_empty`` left uninitialised (float32, as HF has them)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "config"):
                with torch.device("cpu"):
                    fresh = type(child)(child.config)
                setattr(parent, child_name, fresh.to(device))
