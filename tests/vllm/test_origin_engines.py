"""Two vLLM engines, two store roots ("two machines"), one S3-compatible origin (a real SeaweedFS, tests/seaweed.py):

    H   kv_producer, root H, origin O    prefills doc, publishes it to H and to O
    I   kv_consumer, root I, origin O    doc+q twice (no vLLM prefix cache): the first load is fetched from O into
                                         I's root, the second is served from I's own tiers
    I0  no connector                     doc+q: the token reference

Each engine runs vLLM's prefill in steps of one block, like tests/vllm/test_connector.py, so H's published KV and
I0's computed KV come from the same steps.
"""
from __future__ import annotations

import random

import pytest

import kvfast
from tests import seaweed
from tests.vllm.test_connector import BLOCK, DOC, QUESTION, TOKENS, VOCAB, _connector, _run_engines, _tiny_llama


@pytest.fixture(scope="module")
def s3():
    with seaweed.serve() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(s3, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("vllm-origin")
    model = _tiny_llama(work / "model", 0)
    rng = random.Random(7)
    doc, q = ([rng.randrange(3, VOCAB) for _ in range(n)] for n in (DOC, QUESTION))
    origin = f"s3://{s3.a.bucket}/{s3.new_prefix()}"
    env = s3.env(s3.a)  # tenant A's credentials, as a node of that tenant runs with them
    stepwise = {"model": str(model), "dtype": "float32", "max_tokens": TOKENS, "logprobs": 5,
                "max_num_batched_tokens": BLOCK}
    engines = _run_engines(work, {"H": {**stepwise, "kv": _connector("kv_producer", work / "root_h", origin=origin),
                                        "prompts": [doc], "max_tokens": 1}}, env)
    engines |= _run_engines(work, {
        "I": {**stepwise, "kv": _connector("kv_consumer", work / "root_i", origin=origin), "prefix_caching": False,
              "prompts": [doc + q, doc + q]},
        "I0": {**stepwise, "kv": None, "prompts": [doc + q]},
    }, env)
    return {"engines": engines, "work": work, "origin": origin, "s3": s3}


def _supplied(result: dict) -> int:
    return (result["kv_transfer_params"] or {}).get("kvfast_supplied_tokens", 0)


def test_a_document_published_by_one_engine_serves_another_through_the_origin(fleet: dict) -> None:
    i, i0 = fleet["engines"]["I"]["results"], fleet["engines"]["I0"]["results"]
    assert [_supplied(r) for r in i] == [DOC // BLOCK * BLOCK] * 2
    assert i[0]["tokens"] == i[1]["tokens"] == i0[0]["tokens"] and len(i0[0]["tokens"]) == TOKENS
    log = fleet["engines"]["I"]["log"]
    assert log.count("prompt tokens loaded") == 2
    # I's ledger says where each load came from: fetched once from the origin into root I, then I's own disk
    records = kvfast.Ledger(fleet["work"] / "root_i").records()
    assert [(r["tokens"], r["tier"]) for r in records] == [(1024, "origin"), (1024, "disk")]


def test_the_origin_holds_the_document_and_the_consumer_node_a_local_copy(fleet: dict) -> None:
    s3, work = fleet["s3"], fleet["work"]
    bucket, prefix = fleet["origin"][len("s3://"):].split("/", 1)
    listed = s3.client(s3.a).list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    assert any(o["Key"].endswith(".kvf") for o in listed), listed
    (h_entry,) = kvfast.Store(work / "root_h").list()
    (i_entry,) = kvfast.Store(work / "root_i").list()
    assert h_entry.key == i_entry.key
    assert h_entry.path.read_bytes() == i_entry.path.read_bytes()  # the node's copy is the published file
