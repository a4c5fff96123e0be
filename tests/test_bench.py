"""kvfast.bench and kvfast.configs: the cheap random-weight models, the page-cache drop, a bench run on a tiny
model (correctness of what it reports, never its speed), and the `kvfast bench` command."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from kvfast import bench, configs, cost
from kvfast.cli import main
from tests.conftest import random_ids, tiny_model

LENGTHS = [24, 40]  # tiny: the bench's arithmetic, not its timing, is under test
QUESTION = 4


# -- configs: named configs and cheap random models ---------------------------------------------------------
@pytest.mark.parametrize("name,layers,hidden,heads,kv_heads,params_b,non_embedding_b", [
    ("qwen3-0.6b", 28, 1024, 16, 8, "0.6", "0.44"),  # as the model cards print them
    ("qwen3-4b", 36, 2560, 32, 8, "4.0", "3.6"),
])
def test_named_configs_have_the_public_shapes_and_parameter_counts(name, layers, hidden, heads, kv_heads,
                                                                   params_b, non_embedding_b):
    config = configs.get_config(name)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (layers, hidden, heads, kv_heads, 128)
    assert config.vocab_size == 151936 and config.tie_word_embeddings
    model = configs.build_model(config, device="meta")
    params = sum(p.numel() for p in model.parameters())
    embedding = config.vocab_size * config.hidden_size
    digits = lambda card: len(card.split(".")[1])  # noqa: E731 - the card's precision
    assert f"{params / 1e9:.{digits(params_b)}f}" == params_b
    assert f"{(params - embedding) / 1e9:.{digits(non_embedding_b)}f}" == non_embedding_b


@pytest.mark.parametrize("name", ["Qwen/Qwen3-4B", "QWEN3-0.6B"])
def test_named_configs_accept_hub_names_and_any_case(name):
    assert configs.named(name) in configs.NAMED_CONFIGS


def test_unknown_model_name_says_what_is_accepted():
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        configs.get_config("no-such-model")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_built_model_computes_exactly_what_transformers_builds_with_the_same_weights(arch):
    reference = tiny_model(arch, torch.float32)
    built = configs.build_model(reference.config, dtype=torch.float32, seed=3)
    reference.load_state_dict(built.state_dict())
    ids = torch.tensor([random_ids(50)])
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_built_model_keeps_rotary_in_float32_and_ties_embeddings():
    model = configs.build_model(configs.get_config("qwen3-0.6b").__class__(
        **{**configs.NAMED_CONFIGS["qwen3-0.6b"][1], "num_hidden_layers": 1, "vocab_size": 512}))
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_built_weights_depend_only_on_the_seed():
    config = tiny_model("qwen3").config
    a, b, c = (configs.build_model(config, seed=s).state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


# -- page cache ---------------------------------------------------------------------------------------------
def test_drop_page_cache_evicts_the_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    path.read_bytes()
    if bench.resident_fraction(path) is None:
        pytest.skip("mincore is not available here")
    assert bench.resident_fraction(path) == 1.0
    assert bench.drop_page_cache(path) == 0.0


# -- a run on a tiny model ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def result():
    model = tiny_model("qwen3", torch.float32)
    return bench.run(model, LENGTHS, label="tiny-qwen3", question_tokens=QUESTION, repeats=2, progress=False)


def test_bench_has_one_row_per_length_with_the_kv_bytes_the_formula_gives(result):
    shape = cost.ModelShape.from_config(tiny_model("qwen3").config)
    assert [r.tokens for r in result.rows] == LENGTHS
    for r in result.rows:
        assert r.kv_bytes == cost.kv_bytes(shape, r.tokens, 4)
        assert r.file_bytes > r.kv_bytes


def test_bench_times_and_ratios_are_consistent(result):
    for r in result.rows:
        assert min(r.prefill_s, r.load_s, r.floor_s, r.ttft_prefill_s, r.ttft_reuse_s) > 0
        assert r.ratio == pytest.approx(r.prefill_s / r.load_s)
        assert r.ttft_ratio == pytest.approx(r.ttft_prefill_s / r.ttft_reuse_s)
        assert r.load_gbps == pytest.approx(r.kv_bytes / r.load_s / 1e9)


def test_bench_first_token_agrees_both_ways(result):
    # float32: prefill of doc + question and load + extend differ only by matmul shapes' rounding
    for r in result.rows:
        assert r.first_token_match
        assert r.max_logit_diff < 1e-4


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_bench_measures_cold_loads_where_the_platform_can_drop_the_file(result):
    assert all(r.load_cold_s is not None and r.ratio_cold is not None for r in result.rows)
    assert "DONTNEED" in result.cold


def test_bench_records_how_it_measured(result):
    out = result.to_json()
    assert bench.BenchResult.from_json(json.loads(json.dumps(out))) == result
    assert out["fingerprint_first_s"] >= 0 and out["fingerprint_check_s"] > 0
    assert {"date", "machine", "device_name", "threads", "versions", "loadavg_start"} <= set(out)


def test_bench_table_lists_every_length(result):
    table = bench.format_table(result)
    lines = table.splitlines()
    assert any("prefill s" in line and "ratio" in line for line in lines)
    assert [line.split()[0] for line in lines[-len(LENGTHS):]] == [str(n) for n in LENGTHS]


def test_cpu_rows_have_no_gpu_tier_columns(result):
    assert all(r.link_s is None and r.ratio_device is None for r in result.rows)
    assert "link-bound" not in bench.format_table(result)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_reports_the_link_bound_and_the_gpu_memory_tier():
    model = tiny_model("qwen3", torch.float32).cuda()
    result = bench.run(model, LENGTHS, question_tokens=QUESTION, repeats=2, progress=False, cold=False)
    for r in result.rows:
        assert r.link_s > 0 and r.device_copy_s > 0
        assert r.ratio_link == pytest.approx(r.prefill_s / r.link_s)
        assert r.ratio_device == pytest.approx(r.prefill_s / r.device_copy_s)
    assert "link-bound ratio" in bench.format_table(result)


@pytest.mark.parametrize("lengths,kwargs", [([], {}), ([0], {}), ([8], {"repeats": 0})],
                         ids=["no-lengths", "zero-length", "zero-repeats"])
def test_bench_refuses_bad_arguments(lengths, kwargs):
    with pytest.raises(ValueError):
        bench.run(tiny_model("llama"), lengths, progress=False, **kwargs)


def test_plot_writes_a_png(result, tmp_path):
    pytest.importorskip("matplotlib")
    out = bench.plot(result, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the command ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", torch.float32).save_pretrained(path)
    return path


BENCH_ARGS = ["--lengths", "16,32", "--question-tokens", "4", "--repeats", "1", "--no-progress", "--no-cold"]


def test_bench_command_json_has_the_rows(model_dir, capsys):
    assert main(["bench", str(model_dir), "--dtype", "float32", "--json", *BENCH_ARGS]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["tokens"] for r in out["rows"]] == [16, 32]
    assert all({"prefill_s", "load_s", "ratio"} <= set(r) for r in out["rows"])
    assert out["dtype"] == "float32"


def test_bench_command_builds_random_weights_from_a_config_json(model_dir, tmp_path, capsys):
    (tmp_path / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    plot = tmp_path / "p.png"
    args = ["bench", str(tmp_path / "config.json"), "--save", str(tmp_path / "b.json"), *BENCH_ARGS]
    if "matplotlib" in sys.modules or _has_matplotlib():
        args += ["--plot", str(plot)]
    assert main(args) == 0
    assert "ratio" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["dtype"] == "bfloat16"
    assert plot.exists() == ("--plot" in args)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_command_plot_without_matplotlib_says_how_to_get_it(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", str(model_dir), "--plot", "x.png", *BENCH_ARGS]) == 2
    assert "pip install" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_bench_command_without_a_gpu_explains_or_skips(model_dir, capsys):
    assert main(["bench", str(model_dir), "--device", "cuda", *BENCH_ARGS]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["bench", str(model_dir), "--device", "cuda", "--skip-unavailable", *BENCH_ARGS]) == 0
    assert "skipped" in capsys.readouterr().out


def test_bench_command_unknown_model_exits_2(capsys):
    assert main(["bench", "no-such-model", *BENCH_ARGS]) == 2
    assert "named config" in capsys.readouterr().err
