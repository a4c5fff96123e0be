"""Shared fixtures: tiny real transformers models (random weights, fixed seeds) and the trained stories260K."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 256


def tiny_model(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """A 2-layer model of ``arch`` with random weights from ``seed`` (GQA: 4 query heads, 2 KV heads)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    common.update(overrides)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**common)).to(dtype).eval()


def stories_model():
    """The real trained tiny Llama in ../shared/models (skips the test when it is absent)."""
    if not (STORIES / "model.safetensors").exists():
        pytest.skip(f"{STORIES} is absent (a user's checkout has no ../shared)")
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(STORIES).eval()


def random_ids(n: int, seed: int = 0, vocab: int = VOCAB) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def random_kv(num_layers: int, num_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """Per-layer K and V ``[num_tokens, heads, head_dim]`` of random bit patterns' worth of values."""
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(num_tokens, heads, head_dim, generator=g).to(dtype)  # noqa: E731
    return [make() for _ in range(num_layers)], [make() for _ in range(num_layers)]


@pytest.fixture(autouse=True)
def _threads():
    # Results must not depend on thread count; fixing it keeps timing of the suite steady on 2 cores.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def flip_bit(path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place (corruption tests)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
