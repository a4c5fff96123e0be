"""kvfast.checkpoint_fingerprint: a checkpoint folder's fingerprint equals that of the model it loads as."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import kvfast
from kvfast.configs import build_model

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def tiny(tmp_path: Path, *, tied: bool, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                         architectures=["LlamaForCausalLM"])
    path = tmp_path / f"tiny-{tied}-{seed}-{dtype}"
    build_model(config, dtype=dtype, seed=seed).save_pretrained(path)
    return path


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16], ids=["saved-f32", "saved-bf16"])
@pytest.mark.parametrize("served", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_equals_fingerprint_of_the_loaded_model(tmp_path, tied, saved, served) -> None:
    path = tiny(tmp_path, tied=tied, dtype=saved)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=served, local_files_only=True)
    assert kvfast.checkpoint_fingerprint(path, dtype=served) == kvfast.fingerprint(model)


@pytest.mark.skipif(not STORIES.is_dir(), reason="trained tiny model ../shared/models/stories260K absent")
def test_trained_checkpoint() -> None:
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32, local_files_only=True)
    assert kvfast.checkpoint_fingerprint(STORIES, dtype=torch.float32) == kvfast.fingerprint(model)


def test_other_weights_or_dtype_give_other_fingerprints(tmp_path) -> None:
    a, b = tiny(tmp_path, tied=False, seed=0), tiny(tmp_path, tied=False, seed=1)
    fps = {kvfast.checkpoint_fingerprint(p, dtype=d) for p in (a, b) for d in (torch.float32, torch.bfloat16)}
    assert len(fps) == 4


def test_missing_or_misshaped_parameters_are_named(tmp_path) -> None:
    path = tiny(tmp_path, tied=False)
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(kvfast.KvfastError, match="lm_head.weight") as info:
        kvfast.checkpoint_fingerprint(path, dtype=torch.float32)
    assert str(path) in str(info.value)
    weights["lm_head.weight"] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(kvfast.KvfastError, match="lm_head.weight has shape"):
        kvfast.checkpoint_fingerprint(path, dtype=torch.float32)


def test_folder_without_safetensors(tmp_path) -> None:
    path = tiny(tmp_path, tied=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(kvfast.KvfastError, match="safetensors"):
        kvfast.checkpoint_fingerprint(path, dtype=torch.float32)
