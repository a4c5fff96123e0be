"""Identity: the model fingerprint and the document key (block hash chain).

Both must be equal across processes (no salted ``hash``), differ whenever KV would differ, and the weights
digest cache must never return a stale value.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kvfast
from kvfast.identity import block_hashes, document_key, fingerprint, kv_shape, model_config, weights_digest
from tests.conftest import random_ids, tiny_model

REPO = Path(__file__).resolve().parents[1]
MODELS = [("llama", torch.float32), ("qwen3", torch.bfloat16), ("mistral", torch.float16)]
BLOCK_TOKENS = [1, 16, 7]
DOC = 100  # tokens: 6 full blocks of 16 and a partial one of 4

# Runs in a fresh interpreter with another hash seed: it must print the same identities as this process.
CHILD = """
import json, torch
from kvfast.identity import block_hashes, document_key, fingerprint
from tests.conftest import random_ids, tiny_model
out = {"fingerprints": [fingerprint(tiny_model(a, getattr(torch, d))) for a, d in %(models)r],
       "chains": {str(b): block_hashes(random_ids(%(doc)d, seed=1), b) for b in %(blocks)r},
       "keys": {str(b): document_key(random_ids(%(doc)d, seed=1), b) for b in %(blocks)r}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def child_identities():
    models = [(a, str(d).removeprefix("torch.")) for a, d in MODELS]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", CHILD % {"models": models, "doc": DOC, "blocks": BLOCK_TOKENS}],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- model fingerprint --------------------------------------------------------------------------------
@pytest.mark.parametrize("index", range(len(MODELS)))
def test_fingerprint_is_equal_across_processes(child_identities, index):
    arch, dtype = MODELS[index]
    fp = fingerprint(tiny_model(arch, dtype))
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert child_identities["fingerprints"][index] == fp


def test_fingerprint_is_a_pure_function_of_config_dtype_and_weights():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    assert fingerprint(a) == fingerprint(b) == fingerprint(a)
    # the statement it hashes, rebuilt here from its documented parts
    statement = json.dumps({"config": model_config(a), "weights": weights_digest(a)}, sort_keys=True,
                           separators=(",", ":"))
    assert fingerprint(a) == "sha256:" + hashlib.sha256(statement.encode()).hexdigest()
    assert kvfast.fingerprint is fingerprint


def test_fingerprint_differs_for_other_weights_with_the_same_config():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert model_config(a) == model_config(b)
    assert weights_digest(a) != weights_digest(b)
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_differs_when_one_weight_element_differs():
    a = tiny_model("qwen2", seed=0)
    b = copy.deepcopy(a)
    with torch.no_grad():
        p = b.model.layers[1].self_attn.v_proj.weight
        p.view(-1)[123] = torch.nextafter(p.view(-1)[123], torch.tensor(float("inf")))
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fingerprint_differs_for_another_dtype(dtype):
    a, b = tiny_model("mistral", torch.float32), tiny_model("mistral", dtype)
    assert model_config(b)["dtype"] == str(dtype).removeprefix("torch.")
    assert fingerprint(a) != fingerprint(b)


CONFIG_CHANGES = [{"rope_theta": 500000.0}, {"rms_norm_eps": 1e-5}, {"max_position_embeddings": 4096}]


@pytest.mark.parametrize("override", CONFIG_CHANGES, ids=lambda o: next(iter(o)))
def test_fingerprint_differs_for_another_config_field(override):
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=0, **override)
    assert weights_digest(a) == weights_digest(b)  # same seed and shapes: only the config differs
    assert model_config(a) != model_config(b)
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_differs_across_architectures_with_equal_shapes():
    a, b = tiny_model("llama", seed=0), tiny_model("mistral", seed=0)
    assert kv_shape(a.config) == kv_shape(b.config)
    assert fingerprint(a) != fingerprint(b)


def test_cached_digest_is_invalidated_by_an_in_place_edit():
    model = tiny_model("llama", seed=0)
    before = fingerprint(model)
    assert fingerprint(model) == before  # served from the cache
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1)
    after = fingerprint(model)
    assert after != before
    # and the new value is the true one: equal to a fresh computation on an uncached copy
    assert after == fingerprint(copy.deepcopy(model))


def test_cached_digest_is_invalidated_by_replacing_a_parameter():
    model = tiny_model("llama", seed=0)
    before = fingerprint(model)
    lm = model.lm_head
    lm.weight = torch.nn.Parameter(lm.weight.detach() * 2)  # a new tensor: new data_ptr, version 0
    after = fingerprint(model)
    assert after != before
    assert after == fingerprint(copy.deepcopy(model))


def test_cached_digest_is_invalidated_by_load_state_dict():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    fa, fb = fingerprint(a), fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert fingerprint(b) == fa != fb


def test_cached_digest_is_invalidated_by_an_edit_through_data():
    model = tiny_model("llama", seed=0)
    before = fingerprint(model)
    model.model.layers[0].mlp.up_proj.weight.data.add_(1)  # an old idiom, still common in user code
    assert fingerprint(model) != before


def test_weights_digest_counts_tied_parameters_once_and_covers_every_parameter():
    model = tiny_model("llama", seed=0, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters(remove_duplicate=True)]
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(remove_duplicate=True), key=lambda kv: kv[0]):
        h.update(f"{name}\0{str(p.dtype).removeprefix('torch.')}\0{tuple(p.shape)}\0".encode())
        h.update(p.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    assert weights_digest(model) == h.hexdigest()
    assert len(names) == len(set(names))


# -- block hashes and document key --------------------------------------------------------------------
@pytest.mark.parametrize("block_tokens", BLOCK_TOKENS)
def test_block_hashes_and_document_key_are_equal_across_processes(child_identities, block_tokens):
    ids = random_ids(DOC, seed=1)
    assert child_identities["chains"][str(block_tokens)] == block_hashes(ids, block_tokens)
    assert child_identities["keys"][str(block_tokens)] == document_key(ids, block_tokens)


@pytest.mark.parametrize("block_tokens", BLOCK_TOKENS)
def test_block_hashes_are_the_documented_chain(block_tokens):
    ids = random_ids(DOC, seed=2)
    prev, want = b"", []
    for i in range(DOC // block_tokens):
        block = np.asarray(ids[i * block_tokens : (i + 1) * block_tokens], dtype="<u4").tobytes()
        prev = hashlib.sha256(prev + block).digest()
        want.append(prev.hex())
    assert block_hashes(ids, block_tokens) == want


@pytest.mark.parametrize("block_tokens", BLOCK_TOKENS)
def test_block_hashes_of_a_prefix_are_a_prefix(block_tokens):
    ids = random_ids(DOC, seed=3)
    full = block_hashes(ids, block_tokens)
    for n in (0, 1, block_tokens - 1, block_tokens, block_tokens + 1, 3 * block_tokens + 2, DOC - 1):
        part = block_hashes(ids[:n], block_tokens)
        assert len(part) == n // block_tokens
        assert part == full[: len(part)]


@pytest.mark.parametrize("block_tokens", BLOCK_TOKENS)
def test_one_different_token_changes_its_block_and_every_later_hash(block_tokens):
    ids = random_ids(DOC, seed=4)
    position = 40
    other = list(ids)
    other[position] = (other[position] + 1) % 256
    a, b = block_hashes(ids, block_tokens), block_hashes(other, block_tokens)
    first = position // block_tokens
    assert a[:first] == b[:first]
    assert all(x != y for x, y in zip(a[first:], b[first:]))
    assert document_key(ids, block_tokens) != document_key(other, block_tokens)


def test_partial_trailing_block_has_no_hash():
    ids = random_ids(DOC, seed=5)
    assert len(block_hashes(ids, 16)) == 6  # 96 tokens hashed, the last 4 are not
    assert block_hashes(ids[:96], 16) == block_hashes(ids, 16)
    assert block_hashes(ids[:15], 16) == []
    assert block_hashes([], 16) == []
    # ... but the document key sees the trailing tokens and the length
    assert document_key(ids[:96], 16) != document_key(ids, 16)
    assert document_key(ids[:97], 16) != document_key(ids[:98], 16)
    last = list(ids)
    last[-1] = (last[-1] + 1) % 256
    assert block_hashes(last, 16) == block_hashes(ids, 16)
    assert document_key(last, 16) != document_key(ids, 16)


def test_document_key_distinguishes_trailing_zeros():
    """Token 0 is a real token: [.., 0] is another document than [..] (the length is hashed)."""
    ids = random_ids(32, seed=6)
    assert document_key(ids, 16) != document_key(ids + [0], 16)
    assert document_key([], 16) != document_key([0], 16)


def test_hashes_accept_lists_arrays_and_tensors_alike():
    ids = random_ids(50, seed=7)
    forms = [ids, np.asarray(ids, dtype=np.int64), np.asarray(ids, dtype=np.uint32), torch.tensor(ids)]
    assert len({tuple(block_hashes(f, 8)) for f in forms}) == 1
    assert len({document_key(f, 8) for f in forms}) == 1


def test_hashes_refuse_bad_input():
    with pytest.raises(ValueError):
        block_hashes([1, 2, 3], 0)
    with pytest.raises(ValueError):
        block_hashes([1, -2, 3])
    with pytest.raises(ValueError):
        document_key([[1, 2], [3, 4]])
