"""The `kvfast` command, run as a real process on real model folders and files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import kvfast
from tests.conftest import random_ids, tiny_model


def kvfast_cli(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kvfast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def published(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("doc")
    ids = folder / "doc.txt"
    ids.write_text(" ".join(map(str, random_ids(300, seed=1))))
    (folder / "q.txt").write_text(" ".join(map(str, random_ids(12, seed=2))))
    kvfast_cli("publish", model_dir, "--token-ids", ids, "-o", folder / "doc.kvf", "--chunk-tokens", 64)
    return folder


def test_help_explains_every_command():
    out = kvfast_cli("--help").stdout
    for cmd in ("publish", "run", "verify", "inspect", "demo"):
        assert cmd in out
        assert "usage: kvfast " + cmd in kvfast_cli(cmd, "--help").stdout


def test_verify_passes_and_reports_json(model_dir, published):
    report = json.loads(kvfast_cli("verify", model_dir, published / "doc.kvf", "--prompt-ids", published / "q.txt",
                                   "--json").stdout)
    assert report["ok"] and report["kv_bitwise_equal"]
    assert report["prefill_tokens_matched"] == report["new_tokens"] == 32
    assert report["prefill_max_logit_diff"] == 0.0
    assert report["scratch_tokens_matched"] == 32 and report["scratch_max_logit_diff"] < 1e-4
    table = kvfast_cli("verify", model_dir, published / "doc.kvf", "--tokens", 8).stdout
    assert "KV bitwise equal to fresh prefill  yes" in table and "8/8" in table


def test_verify_exits_1_when_kv_differs(model_dir, published, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    doc = random_ids(300, seed=1)
    keys, values = kvfast.capture_kv(model, doc)
    keys[1][200, 0, 3] += 1e-3  # one value of one layer: loadable (right model, valid checksums) but not exact
    kvfast.save_kv(tmp_path / "bad.kvf", keys, values, doc, fingerprint=kvfast.fingerprint(model))
    report = json.loads(kvfast_cli("verify", model_dir, tmp_path / "bad.kvf", "--json", check_rc=1).stdout)
    assert not report["ok"] and not report["kv_bitwise_equal"]


def test_inspect_and_run(model_dir, published):
    info = json.loads(kvfast_cli("inspect", published / "doc.kvf", "--verify", "--json").stdout)
    assert info["tokens"]["count"] == 300 and info["kv"]["num_layers"] == 2 and info["checksums_verified"]
    assert info["chunks"] == 2 * 5 and info["model"]["config"]["architecture"] == "LlamaForCausalLM"
    out = kvfast_cli("run", model_dir, "--kv", published / "doc.kvf", "--prompt-ids", published / "q.txt",
                     "--max-new-tokens", 5).stdout.split()
    assert len(out) == 5 and all(t.isdigit() for t in out)


@pytest.mark.parametrize("damage", ["not_kvf", "truncated", "flipped"])
def test_bad_files_exit_2_naming_the_file(published, model_dir, tmp_path, damage):
    data = bytearray((published / "doc.kvf").read_bytes())
    if damage == "not_kvf":
        data = bytearray(b"hello, world\n" * 100)
    elif damage == "truncated":
        data = data[: len(data) - 1000]
    else:
        data[-100] ^= 0x10  # inside the last chunk
    bad = tmp_path / f"{damage}.kvf"
    bad.write_bytes(bytes(data))
    proc = kvfast_cli("verify", model_dir, bad, check_rc=2)
    assert str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_other_model_exits_2(published, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", torch.float32, seed=1).save_pretrained(other)  # same config, other weights
    proc = kvfast_cli("run", other, "--kv", published / "doc.kvf", "--prompt-ids", published / "q.txt", check_rc=2)
    assert "other weights" in proc.stderr


def test_demo_runs_end_to_end():
    out = kvfast_cli("demo", "--tokens", 200, "--layers", 2).stdout
    assert "KV bitwise equal to fresh prefill  yes" in out and "32/32" in out and "OK" in out
