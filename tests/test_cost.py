"""kvfast.cost: the byte and FLOP formulas against what kvfast writes and what the model executes, the anchor
paper's figures reproduced from its own inputs, and the `kvfast cost` command."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kvfast
from kvfast import cost
from kvfast.cli import main
from kvfast.configs import get_config
from kvfast.identity import kv_shape
from kvfast.hf import prefill
from tests.conftest import ARCHITECTURES, random_ids, tiny_model

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Config variants that change the KV shape: layers, KV heads (MHA, GQA, MQA), head_dim not hidden/heads.
SHAPES = [
    dict(),
    dict(num_hidden_layers=3, num_key_value_heads=1),
    dict(num_attention_heads=4, num_key_value_heads=4, head_dim=24),
]
DOC_TOKENS = 77  # not a multiple of the chunk or block size
PAPER_TOKENS = 3774


def qwen3_4b() -> cost.ModelShape:
    return cost.ModelShape.from_config(get_config("qwen3-4b"), name="qwen3-4b")


# -- bytes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kv_bytes_formula_equals_the_files_chunk_bytes_for_each_architecture(tmp_path, arch):
    model = tiny_model(arch, torch.float32)
    path = kvfast.publish(model, random_ids(DOC_TOKENS), tmp_path / "doc.kvf", chunk_tokens=32)
    with kvfast.open(path) as r:
        written = sum(c.raw_length for c in r.chunks)
    assert written == cost.kv_bytes(cost.ModelShape.from_config(model.config), DOC_TOKENS, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_bytes_formula_equals_the_files_chunk_bytes_for_each_dtype(tmp_path, dtype):
    model = tiny_model("qwen3", dtype)
    path = kvfast.publish(model, random_ids(DOC_TOKENS), tmp_path / "doc.kvf")
    with kvfast.open(path) as r:
        written = sum(c.raw_length for c in r.chunks)
    assert written == cost.kv_bytes(cost.ModelShape.from_config(model.config), DOC_TOKENS, dtype.itemsize)


@pytest.mark.parametrize("overrides", SHAPES, ids=["gqa", "3-layer-mqa", "mha-head-dim-24"])
def test_kv_bytes_formula_equals_the_files_chunk_bytes_for_each_shape(tmp_path, overrides):
    model = tiny_model("llama", torch.bfloat16, **overrides)
    shape = cost.ModelShape.from_config(model.config)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == kv_shape(model.config)
    path = kvfast.publish(model, random_ids(DOC_TOKENS), tmp_path / "doc.kvf", chunk_tokens=16)
    with kvfast.open(path) as r:
        written = sum(c.raw_length for c in r.chunks)
    assert written == cost.kv_bytes(shape, DOC_TOKENS, 2) == DOC_TOKENS * cost.kv_bytes_per_token(shape, 2)


def test_weight_bytes_are_the_matmul_weights_of_the_model():
    from kvfast.configs import build_model

    model = build_model(get_config("qwen3-4b"), device="meta")
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2)  # tied: lm_head == embedding
    assert cost.weight_bytes(qwen3_4b(), 2) == 2 * matmul


# -- FLOPs ------------------------------------------------------------------------------------------------
def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def eager(arch: str, **overrides):
    model = tiny_model(arch, torch.float32, **overrides)
    model.set_attn_implementation("eager")  # explicit matmuls, which FlopCounterMode counts (CPU SDPA it does not)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prefill_flops_match_the_counted_matmuls_of_a_chunked_prefill(arch):
    model = eager(arch)
    shape = cost.ModelShape.from_config(model.config)
    tokens, chunk = 300, 64
    counted = counted_flops(lambda: prefill(model, random_ids(tokens), prefill_chunk=chunk))
    predicted = cost.prefill_flops(shape, tokens, chunk=chunk)
    attention = sum(cost.attention_flops(shape, q, p) for q, p in cost.chunks(tokens, chunk))
    assert attention > 0.25 * predicted  # the L² term is a real part of what is checked here
    assert predicted == pytest.approx(counted, rel=0.02)


def test_question_flops_after_a_document_match_the_counted_matmuls():
    model = eager("qwen3", num_hidden_layers=3)
    shape = cost.ModelShape.from_config(model.config)
    past = prefill(model, random_ids(200))
    ids = torch.tensor([random_ids(16, seed=1)])
    counted = counted_flops(lambda: model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1))
    assert cost.forward_flops(shape, 16, past=200) == pytest.approx(counted, rel=0.02)


def test_all_logits_forward_counts_the_lm_head_for_every_token():
    model = eager("mistral")
    shape = cost.ModelShape.from_config(model.config)
    ids = torch.tensor([random_ids(96)])
    with torch.no_grad():
        counted = counted_flops(lambda: model(input_ids=ids))
    assert cost.prefill_flops(shape, 96, chunk=96, all_logits=True) == pytest.approx(counted, rel=0.02)


def test_causal_skip_counts_only_unmasked_pairs():
    shape = cost.ModelShape(layers=1, hidden=8, heads=1, kv_heads=1, head_dim=1, intermediate=8, vocab=8)
    assert cost.attention_flops(shape, 3, causal_skip=True) == 4 * (1 + 2 + 3)
    assert cost.attention_flops(shape, 3) == 4 * 9
    assert cost.attention_flops(shape, 2, past=5, causal_skip=True) == 4 * (6 + 7)


def test_chunks_cover_the_document_in_order():
    assert cost.chunks(1100, 512) == [(512, 0), (512, 512), (76, 1024)]
    assert cost.chunks(16, 512, past=3774) == [(16, 3774)]


# -- the anchor paper's figures ---------------------------------------------------------------------------
def test_paper_qwen3_4b_kv_is_0_148_mb_per_token_and_a_3774_token_artifact_is_0_54_to_0_56_gb():
    assert cost.kv_bytes_per_token(qwen3_4b(), 2) / 1e6 == pytest.approx(0.148, rel=0.01)
    assert 0.54 <= cost.kv_bytes(qwen3_4b(), PAPER_TOKENS, 2) / 1e9 <= 0.56


def paper_bench(prefill_s: float, saving: float) -> dict:
    """A kvfast bench result holding the paper's measured ratio at its document length."""
    return {"model": "qwen3-4b", "rows": [{"tokens": PAPER_TOKENS, "prefill_s": prefill_s, "ttft_prefill_s": prefill_s,
                                           "ttft_reuse_s": prefill_s / saving}]}


def test_paper_dollar_figures_follow_from_its_own_measurements():
    # The paper's inputs: a 49.7x measured saving, $0.09/GB egress, and a prefill priced at $0.049 / 2.6 per load.
    prefill_dollars = 0.049 / 2.6
    seconds = 30.0  # any duration: the price per hour below makes it cost prefill_dollars
    hw = cost.with_price(cost.HARDWARE["h100"], dollars_per_hour=prefill_dollars * 3600 / seconds)
    r = cost.estimate(qwen3_4b(), PAPER_TOKENS, agents=80e6, hardware=hw,
                      measured=cost.measured_times(paper_bench(seconds, 49.7), PAPER_TOKENS))
    assert r.total_reprefill_dollars == pytest.approx(1.5e6, rel=0.02)
    assert r.total_reuse_dollars == pytest.approx(0.03e6, rel=0.02)
    assert r.total_reprefill_dollars / r.total_reuse_dollars == pytest.approx(49.7, rel=0.01)
    # $0.049 for the paper's 0.54 GB; the formula's artifact is 0.556 GB, so 3% more
    assert r.egress_dollars == pytest.approx(0.049, rel=0.04)
    assert r.egress_vs_prefill == pytest.approx(2.6, rel=0.04)
    assert 1.0 <= r.break_even_reuses < 1.1  # "break-even after about one reuse"
    assert r.break_even_shipped == math.inf  # egress costs more than the prefill it saves
    assert r.tariff_headroom == pytest.approx(4.97, rel=0.01)


@pytest.mark.parametrize("gpu", sorted(cost.HARDWARE))
def test_first_principles_saving_grows_with_length_and_breaks_even_after_about_one_reuse(gpu):
    lengths = [255, 512, 1024, 2048, PAPER_TOKENS]
    savings = [s for _, s in cost.saving_curve(qwen3_4b(), lengths, hardware=cost.HARDWARE[gpu])]
    assert all(a < b for a, b in zip(savings, savings[1:]))
    r = cost.estimate(qwen3_4b(), PAPER_TOKENS, hardware=cost.HARDWARE[gpu])
    assert 1.0 <= r.break_even_reuses < 1.5
    assert r.flops_ratio > 100  # FLOPs alone: the question is a tiny fraction of prefill


def test_batch_shares_the_weight_read_of_short_forwards():
    one = cost.estimate(qwen3_4b(), PAPER_TOKENS, hardware=cost.HARDWARE["h100"])
    many = cost.estimate(qwen3_4b(), PAPER_TOKENS, hardware=cost.HARDWARE["h100"], batch=64)
    assert many.reuse_resident_s < one.reuse_resident_s / 4
    assert many.prefill_s == pytest.approx(one.prefill_s, rel=0.01)  # prefill is compute-bound either way


# -- measured seconds -------------------------------------------------------------------------------------
def bench_rows(*lengths: int) -> dict:
    # a power law t = c * L^1.5 for prefill, linear for reuse: log-log interpolation recovers it exactly
    return {"model": "m", "rows": [{"tokens": n, "prefill_s": 1e-4 * n**1.5, "ttft_prefill_s": 2e-4 * n**1.5,
                                    "ttft_reuse_s": 1e-5 * n} for n in lengths]}


@pytest.mark.parametrize("tokens,how", [(512, "measured"), (700, "interpolated"), (4096, "extrapolated"),
                                        (100, "extrapolated")])
def test_measured_times_reads_interpolates_and_extrapolates_on_log_log(tokens, how):
    m = cost.measured_times(bench_rows(256, 512, 1024, 2048), tokens)
    assert m.how.startswith(how)
    assert m.publish_s == pytest.approx(1e-4 * tokens**1.5, rel=1e-9)
    assert m.prefill_s == pytest.approx(2e-4 * tokens**1.5, rel=1e-9)
    assert m.reuse_s == pytest.approx(1e-5 * tokens, rel=1e-9)


@pytest.mark.parametrize("bench", [{"rows": []}, bench_rows(256), {"rows": [{"tokens": 1}, {"tokens": 2}]}],
                         ids=["no-rows", "one-row", "not-a-bench"])
def test_measured_times_refuses_what_it_cannot_use(bench):
    with pytest.raises(ValueError):
        cost.measured_times(bench, 300)


# -- the command ------------------------------------------------------------------------------------------
def test_cost_command_prints_the_paper_case(capsys):
    assert main(["cost", "--model", "qwen3-4b", "--tokens", str(PAPER_TOKENS), "--agents", "80e6"]) == 0
    out = capsys.readouterr().out
    for what in ("KV bytes per token", "147,456 B", "break-even", "80,000,000 agents: re-prefill", "tariff headroom",
                 "egress"):
        assert what in out


def test_cost_command_json_uses_the_prices_given(capsys):
    args = ["cost", "--model", "qwen3-0.6b", "--tokens", "2048", "--agents", "1000", "--gpu", "a100",
            "--gpu-dollars-per-hour", "4", "--egress-dollars-per-gb", "0.05", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kv_bytes_per_token"] == 2 * 28 * 8 * 128 * 2
    assert r["hardware"]["dollars_per_hour"] == 4
    assert r["egress_dollars"] == pytest.approx(r["kv_bytes"] / 1e9 * 0.05)
    assert r["total_reprefill_dollars"] == pytest.approx(1000 * r["prefill_dollars"])


def test_cost_command_measured_takes_the_bench_seconds(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(paper_bench(20.0, 49.7)))
    args = ["cost", "--model", "qwen3-4b", "--tokens", str(PAPER_TOKENS), "--measured", str(bench), "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prefill_s"] == 20.0 and r["saving"] == pytest.approx(49.7)
    assert r["source"].startswith("measured")


@pytest.mark.parametrize("args", [["--model", "no-such-model"], ["--model", "qwen3-4b", "--measured", "missing.json"]],
                         ids=["unknown-model", "missing-bench"])
def test_cost_command_bad_input_exits_2(args, capsys):
    assert main(["cost", "--tokens", "100", *args]) == 2
    assert "kvfast: error:" in capsys.readouterr().err
