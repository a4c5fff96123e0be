"""The `kvfast` command, run as a real process (its console script) on real model folders and files.

Exit codes have one meaning each: 0 success, 1 the check ran and failed, 2 bad input or usage, 130 interrupted;
an ordinary mistake gets one line naming the value and what is allowed, never a traceback.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kvfast
from tests.conftest import VOCAB, random_ids, tiny_model

KVFAST = Path(sys.executable).parent / "kvfast"  # the console script pip installed beside this interpreter


def kvfast_cli(*args, check_rc: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(KVFAST), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, no traceback, and exactly one error line (the last one), naming every one of ``names``."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


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


# -- help, version, import cost ---------------------------------------------------------------------------
def _subcommands(parser) -> dict[str, object]:
    """Every (sub)command's parser, by its full name ("kvfast store put")."""
    import argparse

    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(_subcommands(sub))
    return found


def test_every_command_and_option_explains_itself():
    from kvfast.cli import build_parser

    parsers = _subcommands(build_parser())
    assert {"kvfast publish", "kvfast run", "kvfast verify", "kvfast inspect", "kvfast demo", "kvfast store put",
            "kvfast store ledger", "kvfast audit", "kvfast cost", "kvfast bench"} <= set(parsers)
    for prog, parser in parsers.items():
        for action in parser._actions:
            assert action.help, f"{prog}: {action.option_strings or action.dest} has no help text"
        assert parser.description, f"{prog} has no description"


def test_help_and_version_answer_without_importing_torch():
    code = ("import sys, kvfast.cli; kvfast.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # every parser is built without a heavy import
    for args in (["--help"], ["--version"], ["store", "put", "--help"], ["publish", "--help"], ["cost", "--help"]):
        t0 = time.perf_counter()
        proc = kvfast_cli(*args)
        assert time.perf_counter() - t0 < 2.0, args  # a fresh interpreter plus argparse: well under a second idle
        assert proc.stdout
    assert kvfast_cli("--version").stdout.strip() == f"kvfast {importlib.metadata.version('kvfast')}"
    assert kvfast.__version__ == importlib.metadata.version("kvfast")


def test_cli_defaults_agree_with_the_library():
    from kvfast.cli import common as cli
    from kvfast.format import DTYPES
    from kvfast.hf import DEFAULT_PREFILL_CHUNK

    assert cli.DEFAULT_PREFILL_CHUNK == DEFAULT_PREFILL_CHUNK

    assert set(cli.DTYPE_NAMES) == set(DTYPES)
    assert all(DTYPES[name].itemsize == cli.DTYPE_BYTES[name] for name in cli.DTYPE_NAMES)


# -- the commands working -----------------------------------------------------------------------------------
def test_verify_passes_and_reports_json(model_dir, published):
    report = json.loads(kvfast_cli("verify", model_dir, published / "doc.kvf", "--prompt-ids", published / "q.txt",
                                   "--json").stdout)
    assert report["ok"] and report["kv_bitwise_equal"]
    assert report["prefill_tokens_matched"] == report["new_tokens"] == 32
    assert report["prefill_max_logit_diff"] == 0.0
    assert report["scratch_tokens_matched"] == 32 and report["scratch_max_logit_diff"] < 1e-4
    proc = kvfast_cli("verify", model_dir, published / "doc.kvf", "--tokens", 8)
    assert "KV bitwise equal to fresh prefill  yes" in proc.stdout and "8/8" in proc.stdout
    assert "generate" in proc.stderr and "prefill" in proc.stderr  # progress of each step, on stderr


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
    proc = kvfast_cli("run", model_dir, "--kv", published / "doc.kvf", "--prompt-ids", published / "q.txt",
                      "--max-new-tokens", 5)
    out = proc.stdout.split()
    assert len(out) == 5 and all(t.isdigit() for t in out)
    assert "generate" in proc.stderr and "5/5" in proc.stderr  # a progress bar over the new tokens
    run = json.loads(kvfast_cli("run", model_dir, "--kv", published / "doc.kvf", "--prompt-ids", published / "q.txt",
                                "--max-new-tokens", 5, "--json").stdout)
    assert run["tokens"] == [int(t) for t in out] and run["document_tokens"] == 300 and run["prompt_tokens"] == 12


def test_json_of_publish_store_put_keygen_sign(model_dir, published, tmp_path):
    out = json.loads(kvfast_cli("publish", model_dir, "--token-ids", published / "doc.txt", "-o", tmp_path / "d.kvf",
                                "--json").stdout)
    assert out["path"] == str(tmp_path / "d.kvf") and out["tokens"] == 300 and out["file_bytes"] > out["kv_bytes"] > 0
    assert out["fingerprint"].startswith("sha256:")
    puts = json.loads(kvfast_cli("store", "put", tmp_path / "store", tmp_path / "d.kvf", tmp_path / "d.kvf",
                                 "--json").stdout)
    assert [p["stored"] for p in puts] == [True, False] and puts[0]["num_tokens"] == 300
    key = json.loads(kvfast_cli("keygen", tmp_path / "k", "--json").stdout)
    assert Path(key["private"]).is_file() and Path(key["public"]).is_file() and key["key_id"]
    signed = json.loads(kvfast_cli("sign", tmp_path / "d.kvf", "--key", tmp_path / "k", "--json").stdout)
    assert signed == [{"path": str(tmp_path / "d.kvf"), "signature": str(tmp_path / "d.kvf.sig")}]


def test_publish_refuses_to_overwrite_unless_forced(model_dir, published, tmp_path):
    out = tmp_path / "doc.kvf"
    out.write_bytes(b"precious")
    proc = kvfast_cli("publish", model_dir, "--token-ids", published / "doc.txt", "-o", out, check_rc=None)
    assert_one_line_error(proc, out, "--force")
    assert out.read_bytes() == b"precious"
    kvfast_cli("publish", model_dir, "--token-ids", published / "doc.txt", "-o", out, "--force")
    with kvfast.open(out) as r:
        assert r.num_tokens == 300


def test_demo_runs_end_to_end():
    out = kvfast_cli("demo", "--tokens", 200, "--layers", 2).stdout
    assert "KV bitwise equal to fresh prefill  yes" in out and "32/32" in out and "OK" in out


# -- bad input: exit 2, one line naming the value, no traceback ---------------------------------------------
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
    assert_one_line_error(kvfast_cli("verify", model_dir, bad, check_rc=None), bad)


def test_other_model_exits_2(published, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", torch.float32, seed=1).save_pretrained(other)  # same config, other weights
    proc = kvfast_cli("run", other, "--kv", published / "doc.kvf", "--prompt-ids", published / "q.txt", check_rc=None)
    assert "other weights" in assert_one_line_error(proc, published / "doc.kvf")


def _ids_file(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


# Each case: the arguments (with {model}, {doc}, {q}, {tmp} filled in) and the words the error line must hold.
BAD_INPUT = {
    "prompt-ids missing": (["verify", "{model}", "{doc}", "--prompt-ids", "{tmp}/missing.txt"],
                           ["{tmp}/missing.txt", "no such file"]),
    "prompt-ids a folder": (["verify", "{model}", "{doc}", "--prompt-ids", "{tmp}"], ["{tmp}", "is a folder"]),
    "prompt-ids empty": (["run", "{model}", "--kv", "{doc}", "--prompt-ids", "{tmp}/empty.txt"],
                         ["{tmp}/empty.txt", "empty"]),
    "prompt-ids not numbers": (["run", "{model}", "--kv", "{doc}", "--prompt-ids", "{tmp}/words.txt"],
                               ["{tmp}/words.txt", "'hello'", "integers"]),
    "id out of vocabulary": (["run", "{model}", "--kv", "{doc}", "--prompt-ids", "{tmp}/oov.txt"],
                             ["{tmp}/oov.txt", f"token id {VOCAB} at position 1", f"0..{VOCAB - 1}"]),
    "negative id": (["publish", "{model}", "--token-ids", "{tmp}/neg.txt", "-o", "{tmp}/x.kvf"],
                    ["{tmp}/neg.txt", "token id -4 at position 0"]),
    "document past the position limit": (["publish", "{model}", "--token-ids", "{tmp}/long.txt", "-o", "{tmp}/x.kvf"],
                                         ["{tmp}/x.kvf", "2049 tokens", "max_position_embeddings=2048"]),
    "verify: missing model folder": (["verify", "{tmp}/no-model", "{doc}"], ["{tmp}/no-model", "no such folder"]),
    "audit: missing model folder": (["audit", "{tmp}/no-model", "{doc}"], ["{tmp}/no-model", "no such folder"]),
    "empty folder as the model": (["run", "{tmp}/empty", "--kv", "{doc}", "--prompt-ids", "{q}"],
                                  ["{tmp}/empty", "not a model folder", "config.json"]),
    "audit --samples 0": (["audit", "{model}", "{doc}", "--samples", "0"], ["--samples", "'0'", ">= 1"]),
    "verify --tokens 0": (["verify", "{model}", "{doc}", "--tokens", "0"], ["--tokens", "'0'", ">= 1"]),
    "verify --tokens -3": (["verify", "{model}", "{doc}", "--tokens", "-3"], ["--tokens", "'-3'", ">= 1"]),
    "publish --chunk-tokens 0": (["publish", "{model}", "--token-ids", "{q}", "-o", "{tmp}/x.kvf", "--chunk-tokens",
                                  "0"], ["--chunk-tokens", "'0'"]),
    "publish --prefill-chunk 0": (["publish", "{model}", "--token-ids", "{q}", "-o", "{tmp}/x.kvf",
                                   "--prefill-chunk", "0"], ["--prefill-chunk", "'0'"]),
    "run --max-new-tokens -1": (["run", "{model}", "--kv", "{doc}", "--prompt-ids", "{q}", "--max-new-tokens", "-1"],
                                ["--max-new-tokens", "'-1'", ">= 0"]),
    "cost --tokens 0": (["cost", "--model", "qwen3-0.6b", "--tokens", "0"], ["--tokens", "'0'"]),
    "inspect a folder": (["inspect", "{tmp}"], ["{tmp}", "is a folder"]),
    "inspect a missing file": (["inspect", "{tmp}/missing.kvf"], ["{tmp}/missing.kvf", "no such file"]),
    "publish -o a folder": (["publish", "{model}", "--token-ids", "{q}", "-o", "{tmp}"], ["{tmp}", "is a folder"]),
    "a file as the store root": (["store", "put", "{q}", "{doc}"], ["{q}", "not a store folder"]),
    "store ls on a folder that is no store": (["store", "ls", "{tmp}/empty"], ["{tmp}/empty", "not a kvfast store"]),
    "store stats on a missing folder": (["store", "stats", "{tmp}/nothing"], ["{tmp}/nothing", "not a kvfast store"]),
    "sign with a missing key": (["sign", "{doc}", "--key", "{tmp}/nokey"], ["{tmp}/nokey", "no such file"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_ordinary_mistakes_exit_2_with_one_line(case, model_dir, published, tmp_path):
    (tmp_path / "empty").mkdir()
    _ids_file(tmp_path, "empty.txt", " \n")
    _ids_file(tmp_path, "words.txt", "1 2 hello")
    _ids_file(tmp_path, "oov.txt", f"1 {VOCAB} 3")
    _ids_file(tmp_path, "neg.txt", "-4 5")
    _ids_file(tmp_path, "long.txt", " ".join(map(str, random_ids(2049))))
    fill = {"model": model_dir, "doc": published / "doc.kvf", "q": published / "q.txt", "tmp": tmp_path}
    args, names = BAD_INPUT[case]
    proc = kvfast_cli(*[a.format(**fill) for a in args], check_rc=None)
    assert_one_line_error(proc, *[n.format(**fill) for n in names])
    assert not (tmp_path / "x.kvf").exists() and not (tmp_path / "nothing").exists()
    assert os.listdir(tmp_path / "empty") == []  # a refused store command created nothing


def test_store_put_names_the_users_file(published, tmp_path):
    data = bytearray((published / "doc.kvf").read_bytes())
    data[-100] ^= 0x10  # a chunk's bytes, found by the checksum check of the store's copy
    bad = tmp_path / "bad.kvf"
    bad.write_bytes(bytes(data))
    line = assert_one_line_error(kvfast_cli("store", "put", tmp_path / "store", bad, check_rc=None), bad, "not stored")
    assert ".tmp" not in line


def test_cost_refuses_a_bench_of_another_model(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"model": "qwen3-0.6b", "rows": [
        {"tokens": 1024, "prefill_s": 1.0, "ttft_prefill_s": 1.0, "ttft_reuse_s": 0.1}]}))
    proc = kvfast_cli("cost", "--model", "qwen3-4b", "--tokens", 1024, "--measured", bench, check_rc=None)
    assert_one_line_error(proc, bench, "qwen3-0.6b", "qwen3-4b")
    kvfast_cli("cost", "--model", "qwen3-0.6b", "--tokens", 1024, "--measured", bench)


def test_a_full_disk_is_one_line_and_leaves_nothing(model_dir, published, tmp_path):
    # The operating system's answer is injected (fsync fails with ENOSPC, as on a full disk); the command,
    # kvfast's writer and its clean-up run for real, in a process of their own.
    script = ("import errno, os, sys\n"
              "def full(fd):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "os.fsync = full\nfrom kvfast.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out" / "doc.kvf"
    proc = subprocess.run([sys.executable, "-c", script, "publish", str(model_dir), "--token-ids",
                           str(published / "q.txt"), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, out, "no space left", "nothing was written")
    assert os.listdir(out.parent) == []


def test_a_bug_exits_3_with_its_traceback(published):
    # 1 means "the check failed" and 2 "your input": a crash must be neither (the bug is injected: open fails)
    script = ("import sys, kvfast\nkvfast.open = lambda path: 1 / 0\n"
              "from kvfast.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "inspect", str(published / "doc.kvf")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3
    assert "ZeroDivisionError" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("kvfast: internal")


def test_ctrl_c_exits_130_with_one_line_and_leaves_nothing(model_dir, tmp_path):
    ids = _ids_file(tmp_path, "long.txt", " ".join(map(str, random_ids(2000))))
    out = tmp_path / "out" / "doc.kvf"
    proc = subprocess.Popen([str(KVFAST), "publish", str(model_dir), "--token-ids", str(ids), "-o", str(out),
                             "--prefill-chunk", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"prefill" not in seen:  # the prefill is running (its progress bar is up): interrupt it
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, seen
        seen += chunk
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "kvfast: interrupted; no file was left half-written"
    assert not out.exists() and (not out.parent.exists() or os.listdir(out.parent) == [])
