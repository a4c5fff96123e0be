"""Token-exact reuse end to end: publish -> file -> load -> continue, against prefill and scratch baselines."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import kvfast
from kvfast.hf.generate import decode
from kvfast.hf import prefill
from tests.conftest import ARCHITECTURES, random_ids, stories_model, tiny_model

DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["NHD", "HND"]
BLOCK_SIZES = [1, 16, 256]
DOC_TOKENS = 300  # not a multiple of the chunk (64), the prefill chunk (128) or most block sizes
NEW_TOKENS = 32
CODECS = ["raw", "lossless"]  # every exactness promise holds for stored and for coded chunks (FORMAT.md §7)


def _publish_and_load(model, doc, tmp_path, *, block_size=16, layout="NHD", codec="raw"):
    path = kvfast.publish(model, doc, tmp_path / "doc.kvf", chunk_tokens=64, prefill_chunk=128, codec=codec)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=4 * (len(doc) // block_size + 8), block_size=block_size,
                                          layout=layout)
    return cache, kvfast.load(path, cache, model=model)


def _check_against_baselines(model, doc, question, cache, seq, dtype):
    loaded = kvfast.generate(model, cache, cache.fork(seq), question, max_new_tokens=NEW_TOKENS)
    fresh = decode(model, prefill(model, doc, prefill_chunk=128), question, max_new_tokens=NEW_TOKENS)
    assert loaded.tokens == fresh.tokens
    assert torch.equal(loaded.logits, fresh.logits)  # bitwise: same KV, same attention inputs

    scratch = decode(model, DynamicCache(), doc + question, max_new_tokens=NEW_TOKENS)
    matched = sum(a == b for a, b in zip(loaded.tokens, scratch.tokens))
    diff = (loaded.logits - scratch.logits).abs().max().item()
    print(f"\n{model.config.model_type} {dtype}: vs one-pass scratch prefill {matched}/{NEW_TOKENS} tokens, "
          f"max |logit diff| {diff:.3g}")
    if dtype == torch.float32:
        assert loaded.tokens == scratch.tokens
        assert diff < 1e-4
    return loaded


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", CODECS)
def test_token_exact_reuse(arch, dtype, codec, tmp_path):
    model = tiny_model(arch, dtype)
    doc, question = random_ids(DOC_TOKENS, seed=1), random_ids(16, seed=2)
    cache, seq = _publish_and_load(model, doc, tmp_path, codec=codec)
    _check_against_baselines(model, doc, question, cache, seq, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("codec", CODECS)
def test_token_exact_reuse_layouts(layout, codec, tmp_path):
    model = tiny_model("qwen3", torch.bfloat16)
    doc, question = random_ids(DOC_TOKENS, seed=3), random_ids(16, seed=4)
    cache, seq = _publish_and_load(model, doc, tmp_path, layout=layout, codec=codec)
    _check_against_baselines(model, doc, question, cache, seq, torch.bfloat16)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_token_exact_reuse_block_sizes(block_size, tmp_path):
    model = tiny_model("llama", torch.float32)
    doc, question = random_ids(DOC_TOKENS, seed=5), random_ids(16, seed=6)
    cache, seq = _publish_and_load(model, doc, tmp_path, block_size=block_size)
    _check_against_baselines(model, doc, question, cache, seq, torch.float32)


@pytest.mark.parametrize("codec", CODECS)
def test_stories260k_trained_model(codec, tmp_path):
    model = stories_model()
    # In-distribution text: the model's own greedy story from BOS, as llama2.c would write it.
    story = [1] + decode(model, DynamicCache(), [1], max_new_tokens=299, return_logits=False).tokens
    doc, question = story[:260], story[260:276]
    cache, seq = _publish_and_load(model, doc, tmp_path, codec=codec)
    _check_against_baselines(model, doc, question, cache, seq, torch.float32)


def test_prefix_load_continues_like_prefill_of_the_prefix(tmp_path):
    model = tiny_model("qwen2", torch.float32)
    doc = random_ids(DOC_TOKENS, seed=7)
    path = kvfast.publish(model, doc, tmp_path / "doc.kvf", chunk_tokens=48, prefill_chunk=128)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=64)
    # 128 ends a prefill forward, so a prefill of the prefix alone does the same arithmetic (a cut inside a
    # forward changes matmul shapes and rounding); it lies inside stored chunk [96, 144): a partial chunk read.
    n = 128
    seq = kvfast.load(path, cache, model=model, num_tokens=n, token_ids=doc[:n])
    loaded = kvfast.generate(model, cache, seq, doc[n : n + 8], max_new_tokens=NEW_TOKENS)
    fresh = decode(model, prefill(model, doc[:n], prefill_chunk=128), doc[n : n + 8], max_new_tokens=NEW_TOKENS)
    assert loaded.tokens == fresh.tokens
    assert torch.equal(loaded.logits, fresh.logits)


def test_hf_generate_over_paged_cache(tmp_path):
    model = tiny_model("mistral", torch.float32)
    doc, question = random_ids(DOC_TOKENS, seed=8), random_ids(16, seed=9)
    cache, seq = _publish_and_load(model, doc, tmp_path)
    ours = kvfast.generate(model, cache, cache.fork(seq), question, max_new_tokens=NEW_TOKENS)
    out = model.generate(torch.tensor([doc + question]), past_key_values=kvfast.PagedCache(cache, cache.fork(seq)),
                         max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    assert out[0, len(doc) + len(question) :].tolist() == ours.tokens


def test_agents_share_document_blocks(tmp_path):
    model = tiny_model("llama", torch.bfloat16)
    doc = random_ids(DOC_TOKENS, seed=10)
    cache, seq = _publish_and_load(model, doc, tmp_path)
    before = [cache.gather(seq, layer) for layer in range(cache.num_layers)]
    used = cache.num_used_blocks
    outs = [kvfast.generate(model, cache, cache.fork(seq), random_ids(8, seed=s), max_new_tokens=8) for s in (1, 2)]
    alone = kvfast.generate(model, cache, cache.fork(seq), random_ids(8, seed=2), max_new_tokens=8)
    assert outs[1].tokens == alone.tokens and torch.equal(outs[1].logits, alone.logits)
    for layer, (k, v) in enumerate(before):  # the shared document was copied on write, never overwritten
        gk, gv = cache.gather(seq, layer)
        assert torch.equal(gk, k) and torch.equal(gv, v)
    # each agent added its own blocks only: the 300-token document's 19 blocks exist once
    assert cache.num_used_blocks - used < 3 * cache.blocks_for(16 + 8 + 16)


def test_seeded_sampling_is_reproducible_and_exact(tmp_path):
    model = tiny_model("qwen3", torch.float32)
    doc, question = random_ids(DOC_TOKENS, seed=11), random_ids(16, seed=12)
    cache, seq = _publish_and_load(model, doc, tmp_path)
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=123)
    a = kvfast.generate(model, cache, cache.fork(seq), question, **kw)
    b = decode(model, prefill(model, doc, prefill_chunk=128), question, **kw)
    assert a.tokens == b.tokens and torch.equal(a.logits, b.logits)
    c = kvfast.generate(model, cache, cache.fork(seq), question, **{**kw, "seed": 124})
    assert c.tokens != a.tokens  # the seed matters
