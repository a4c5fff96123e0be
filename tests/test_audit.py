"""The audit (kvfast.trust.audit): honest KV passes whoever made it; swapped, edited or foreign KV is caught.

Small N here (tiny models, short documents, tens of audits); bench/bench_audit.py runs the full numbers
(4096-token documents, >= 1000 honest audits per model) and records them in bench/RESULTS.md "Trust".
"""
from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.trust.audit import AuditReport, Tolerance, calibrate, check, recompute, recompute_layer0, sample_positions
from kvfast.errors import ModelMismatchError
from tests.conftest import STORIES, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_audit as B  # noqa: E402 - the perturbations the benchmark measures, tested here at small N

ROOT = "ab" * 32
TOKENS = 256


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model_bf16(request):
    return tiny_model(request.param, torch.bfloat16, seed=0, vocab_size=B.VOCAB)


def doc(seed: int, n: int = TOKENS) -> torch.Tensor:
    return B.doc(n, seed)


# -- positions ----------------------------------------------------------------------------------------------
def test_positions_are_secret_and_artifact_bound():
    p = sample_positions(b"s1", ROOT, 4096, 8)
    assert p == sample_positions(b"s1", ROOT, 4096, 8)
    assert p != sample_positions(b"s2", ROOT, 4096, 8) and p != sample_positions(b"s1", "cd" * 32, 4096, 8)
    assert p == sorted(set(p)) and len(p) == 8 and p[-1] == 4095
    strata = [(k * 4095 // 7, (k + 1) * 4095 // 7) for k in range(7)]
    assert all(a <= x < b for x, (a, b) in zip(p, strata))  # one per stratum
    assert sample_positions(b"s", ROOT, 5, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        sample_positions(b"s", ROOT, 10, 0)


def test_positions_cover_the_document_evenly():
    hits = torch.zeros(100)
    for i in range(400):
        for x in sample_positions(i.to_bytes(4, "little"), ROOT, 100, 11):
            hits[x] += 1
    assert hits[:-1].min() > 0 and hits[-1] == 400


# -- honest KV passes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_honest_kv_passes_across_attention_and_threads(tmp_path, dtype):
    model = tiny_model("llama", dtype, seed=0, vocab_size=B.VOCAB)
    failures = audits = 0
    for d in range(2):
        ids = doc(d)
        for attn, threads in B.PUBLISHERS:
            path = B.save(tmp_path / "h.kvf", model, ids, *B.make_kv(model, ids, attn, threads), attn)
            auditor = B.Auditor(model, *B.other(attn, threads))
            for _ in range(10):
                r = auditor(path, 16)
                failures += not r.ok
                audits += 1
    assert failures == 0, f"{failures}/{audits} honest audits failed"


def test_published_file_passes_and_report_says_why(tmp_path, model_bf16):
    path = kvfast.publish(model_bf16, doc(0), tmp_path / "d.kvf")
    r = kvfast.audit(model_bf16, path, samples=8, secret=b"consumer")
    assert isinstance(r, AuditReport) and r.ok and r.failed_layers == []
    assert r.positions == sample_positions(b"consumer", r.merkle_root, TOKENS, 8)
    assert r.sample_errors.shape == (8, 2, 2) and r.layer_errors.shape == (2, 2)
    assert (r.sample_errors[:, 0] == 0).all()  # layer 0 depends on the token alone: recomputed bit for bit
    assert r.layer0_positions == list(range(TOKENS)) and (r.layer0_errors == 0).all()  # 460 >= 256: every one
    deep_only = kvfast.audit(model_bf16, path, samples=8, layer0_samples=0, secret=b"consumer")
    assert 0 < deep_only.cost_fraction < 0.1 and len(r.worst) == 5
    c = model_bf16.config  # the layer-0 checks cost layer 0's q, k and v projections per position
    assert r.flops == deep_only.flops + 2 * TOKENS * c.hidden_size * c.head_dim * (c.num_attention_heads
                                                                                   + 2 * c.num_key_value_heads)
    assert json.loads(json.dumps(r.to_json()))["layer0_samples"] == TOKENS


def test_layer0_is_recomputed_from_the_token_alone_as_prefill_made_it(model_bf16):
    ids = doc(4)
    keys, values = kvfast.capture_kv(model_bf16, ids)
    positions = [0, 5, 77, 255]
    k0, v0 = recompute_layer0(model_bf16, ids, positions)
    assert torch.equal(k0, keys[0][positions]) and torch.equal(v0, values[0][positions])
    deep_k, deep_v = recompute(model_bf16, ids, keys, values, positions)
    assert torch.equal(k0, deep_k[0]) and torch.equal(v0, deep_v[0])


def test_layer0_checks_catch_an_edit_no_full_depth_sample_can_see(tmp_path, model_bf16):
    ids = doc(17)
    keys, values = kvfast.capture_kv(model_bf16, ids)
    row = values[0][100].float()
    values[0][100] = (row + 0.05 * row.norm() / row.numel() ** 0.5).to(row.dtype)  # a small steering edit
    path = B.save(tmp_path / "e.kvf", model_bf16, ids, keys, values, "sdpa")
    assert kvfast.audit(model_bf16, path, positions=[50, 99], layer0_samples=0).ok  # before the edit: blind
    r = kvfast.audit(model_bf16, path, positions=[50, 99], layer0_samples=TOKENS)
    assert not r.ok and r.failed_layers == []
    assert (r.worst[0]["position"], r.worst[0]["layer"], r.worst[0]["kv"]) == (100, 0, "V")


def test_recompute_equals_prefill_in_float32():
    model = tiny_model("llama", torch.float32, seed=0, vocab_size=B.VOCAB)
    ids = doc(3, 64)
    keys, values = kvfast.capture_kv(model, ids)
    for positions in ([0], [0, 1, 63], list(range(0, 64, 7))):
        se, le = check(model, ids, keys, values, positions)
        assert se.max() < 1e-5 and le.max() < 1e-5


def test_calibration_is_cached_and_per_layer(model_bf16):
    tol = calibrate(model_bf16)
    assert tol is calibrate(model_bf16)
    assert len(tol.sample) == len(tol.layer) == 2
    assert tol.sample[0] < tol.sample[1]  # layer 0 is exact: only the floor


# -- what it catches ----------------------------------------------------------------------------------------
def test_swapped_kv_is_caught_with_8_samples(tmp_path, model_bf16):
    auditor = B.Auditor(model_bf16, "eager", 1)
    ids = doc(10)
    rng = random.Random(0)
    for f in range(4):
        at = rng.randrange(TOKENS - B.INSTRUCTION_TOKENS)
        spliced = torch.cat([ids[:at], doc(20 + f, B.INSTRUCTION_TOKENS), ids[at:]])[:TOKENS]
        for made_from in (spliced, doc(30 + f)):
            path = B.save(tmp_path / "s.kvf", model_bf16, ids, *B.make_kv(model_bf16, made_from, "sdpa", 2), "sdpa")
            assert not auditor(path, 8).ok


def test_another_checkpoint_is_caught_with_8_samples(tmp_path, model_bf16):
    twin = copy.deepcopy(model_bf16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1 + 1e-3 * torch.randn(p.shape, generator=g).to(p.dtype))
    ids = doc(11)
    path = B.save(tmp_path / "t.kvf", model_bf16, ids, *B.make_kv(twin, ids, "sdpa", 2), "sdpa")
    reports = [B.Auditor(model_bf16, "eager", 1)(path, 8) for _ in range(5)]
    assert not any(r.ok for r in reports)


def test_steering_one_percent_of_positions_is_caught(tmp_path):
    model = tiny_model("llama", torch.bfloat16, seed=0, vocab_size=B.VOCAB, num_hidden_layers=4)
    ids = doc(12, 1024)
    keys, values = B.make_kv(model, ids, "sdpa", 2)
    rng = random.Random(1)
    auditor = B.Auditor(model, "eager", 1)
    caught = 0
    for trial in range(20):
        k, v = B.steer(keys, values, B.edit_positions(1024, 0.01, rng), 1.0, rng)
        caught += not auditor(B.save(tmp_path / "e.kvf", model, ids, k, v, "sdpa"), 48, secret=bytes([trial])).ok
    assert caught >= 17  # bench/bench_audit.py measures the rate at 4096 tokens over 100 trials


def test_a_huge_exponent_flip_anywhere_before_the_last_layer_is_caught(tmp_path, model_bf16):
    ids = doc(12)
    keys, values = kvfast.capture_kv(model_bf16, ids)
    rng = random.Random(2)
    for trial in range(10):
        k, v = [t.clone() for t in keys], [t.clone() for t in values]
        row = rng.choice([k, v])[0][rng.randrange(TOKENS - 1)].view(-1)  # layer 0, not the last position
        i = rng.randrange(row.numel())
        row[i] = row[i].abs().clamp_min(1e-3) * 2.0**64  # what setting a high exponent bit does
        r = kvfast.audit(model_bf16, B.save(tmp_path / "f.kvf", model_bf16, ids, k, v, "sdpa"), samples=8,
                         secret=bytes([trial]))
        assert not r.ok


def test_direct_edit_of_a_sampled_position_names_it(tmp_path, model_bf16):
    ids = doc(13)
    keys, values = kvfast.capture_kv(model_bf16, ids)
    keys[1][100].view(-1)[3] += 4.0  # layer 1 has no later layer: only a sample at 100 sees it
    path = B.save(tmp_path / "d.kvf", model_bf16, ids, keys, values, "sdpa")
    r = kvfast.audit(model_bf16, path, positions=[50, 100, 255])
    assert not r.ok and r.worst[0]["position"] == 100 and r.worst[0]["layer"] == 1 and r.worst[0]["kv"] == "K"
    assert kvfast.audit(model_bf16, path, positions=[50, 99, 101, 255]).ok  # not sampled, not seen


def test_nonfinite_kv_fails(tmp_path, model_bf16):
    ids = doc(14)
    keys, values = kvfast.capture_kv(model_bf16, ids)
    values[0][7].view(-1)[0] = float("nan")
    r = kvfast.audit(model_bf16, B.save(tmp_path / "n.kvf", model_bf16, ids, keys, values, "sdpa"), positions=[7])
    assert not r.ok and r.sample_errors.isinf().any()


def test_refuses_other_models_file_and_bad_positions(tmp_path, model_bf16):
    other = tiny_model("llama", torch.bfloat16, seed=1, vocab_size=B.VOCAB)
    path = kvfast.publish(other, doc(0, 32), tmp_path / "o.kvf")
    with pytest.raises(ModelMismatchError, match="another model"):
        kvfast.audit(model_bf16, path)
    with pytest.raises(ValueError, match="sorted"):
        kvfast.audit(other, path, positions=[5, 3])
    with pytest.raises(ValueError, match="layers"):
        kvfast.audit(other, path, tolerance=Tolerance((1.0,), (1.0,)))


def test_cli_audit_exit_codes(tmp_path, capsys):
    if not (STORIES / "model.safetensors").exists():
        pytest.skip(f"{STORIES} is absent")
    from kvfast.cli import main

    from kvfast import configs

    model = configs.load_model(STORIES, dtype=torch.float32)
    ids = doc(15)
    path = kvfast.publish(model, ids, tmp_path / "s.kvf")
    assert main(["audit", str(STORIES), str(path), "--samples", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    keys, values = kvfast.capture_kv(model, doc(16))  # another document's KV under the claimed ids
    B.save(tmp_path / "bad.kvf", model, ids, keys, values, "sdpa")
    assert main(["audit", str(STORIES), str(tmp_path / "bad.kvf")]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bench_quick_rows(tmp_path, model_bf16):
    """The benchmark's experiments at small N: honest audits pass, swaps are caught."""
    rng = random.Random(2)
    row = B.honest(model_bf16, "tiny", tmp_path, 128, docs=1, audits_per_file=5, samples=8)
    assert row.trials == 10 and row.caught == 0
    for r in B.swapped(model_bf16, "tiny", tmp_path, 256, files=1, audits_per_file=3, samples=8, rng=rng):
        assert r.rate == 1.0
