"""PagedCache under transformers' own generate features that edit the cache: crop (prompt lookup, assisted
decoding) and reorder_cache (beam search)."""
from __future__ import annotations

import pytest
import torch

import kvfast
from kvfast.hf.capture import prefill
from tests.conftest import random_ids, tiny_model

DOC = random_ids(100, seed=4)
QUESTION = [5, 6, 7, 8] + DOC[10:20]  # repeats an n-gram of the document, so prompt lookup proposes drafts


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", torch.float32)


def test_prompt_lookup_from_an_empty_paged_sequence_matches_plain_generate(model):
    ids = torch.tensor([DOC + QUESTION])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=64)
    seq = cache.new_sequence()
    crops = []
    past = kvfast.PagedCache(cache, seq)
    real_crop = past.crop
    past.crop = lambda n: (crops.append(n), real_crop(n))  # count the calls; the real crop runs
    out = model.generate(ids, past_key_values=past, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(out, expected)
    assert any(n < 0 for n in crops), "prompt lookup never rejected a draft: the test exercised no crop"
    assert cache.num_used_blocks == cache.blocks_for(seq.num_tokens)  # rejected drafts' blocks went back
    cache.free(seq)
    assert cache.num_used_blocks == 0


def test_prompt_lookup_after_a_loaded_document_matches_a_dynamic_cache(model, tmp_path):
    # transformers' assisted decoding over a pre-filled cache: whatever it does with a DynamicCache holding
    # the document, a PagedCache holding the loaded document must do bit for bit
    path = kvfast.publish(model, DOC, tmp_path / "doc.kvf")
    ids = torch.tensor([DOC + QUESTION])
    expected = model.generate(ids, past_key_values=prefill(model, DOC), max_new_tokens=12, do_sample=False,
                              prompt_lookup_num_tokens=3)
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=64)
    doc = kvfast.load(path, cache, model=model)
    child = cache.fork(doc)
    out = model.generate(ids, past_key_values=kvfast.PagedCache(cache, child), max_new_tokens=12, do_sample=False,
                         prompt_lookup_num_tokens=3)
    assert torch.equal(out, expected)
    cache.free(child)
    assert cache.num_used_blocks == cache.blocks_for(100)  # the document's blocks, untouched by the crops
    k, v = cache.gather(doc, 0)
    keys, values = kvfast.capture_kv(model, DOC)
    assert torch.equal(k, keys[0]) and torch.equal(v, values[0])


@pytest.mark.parametrize("remove", [-1, -16, -17, -40])
@torch.no_grad()
def test_crop_is_a_truncation_that_keeps_a_shared_block_intact(model, remove):
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=64, block_size=16)
    parent = cache.new_sequence()
    past = kvfast.PagedCache(cache, parent)
    model(input_ids=torch.tensor([DOC[:50]]), past_key_values=past, use_cache=True)
    child = cache.fork(parent)
    before = [cache.gather(parent, layer) for layer in range(cache.num_layers)]
    past_child = kvfast.PagedCache(cache, child)
    past_child.crop(remove)
    assert child.num_tokens == past_child.get_seq_length() == 50 + remove
    assert len(child.block_table) == cache.blocks_for(50 + remove)
    model(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=past_child, use_cache=True)  # writes after the cut
    after = [cache.gather(parent, layer) for layer in range(cache.num_layers)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after))


def test_reorder_cache_accepts_batch_one_and_refuses_beams(model):
    cache = kvfast.PagedKVCache.for_model(model, num_blocks=8)
    past = kvfast.PagedCache(cache, cache.new_sequence())
    past.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="beam search"):
        past.reorder_cache(torch.tensor([1, 0]))
