"""bench/gpu_check.sh without a device: its --dry-run mode, its budget and its stop after a failed gate.

The script is the one command a GPU machine runs; it must not be debugged there. --dry-run runs everything that
needs no device (setup.py, the gate's imports, pytest's collection of every GPU test, each benchmark's argument
parsing, the summary), so a missing import, a wrong flag or a broken step fails here, in CI.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["build", "gate", "first-run", "gpu-tests", "bench_load_gpu", "bench_kernels", "prefill_vs_reuse",
         "bench_codec_gpu"]
MAX_FILES_BACK = 8  # what the device tool returns from $OUT


def run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "KVFAST_BENCH_OUT": str(out), "PYTHON": sys.executable, **env}
    environment.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=900)


def summary_rows(out: Path) -> dict[str, str]:
    """step -> result, from summary.txt's step table."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        m = re.match(r"^(\S+)\s{2,}(.+?)\s+(\d+)$", line)
        if m and m.group(1) in STEPS:
            rows[m.group(1)] = m.group(2)
    return rows


def test_dry_run_runs_every_step_but_the_device(tmp_path):
    done = run(tmp_path, "--dry-run", "--no-build")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = summary_rows(tmp_path)
    assert rows == {"build": "not run (--no-build)", **{step: "ok" for step in STEPS[1:]}}, rows
    log = (tmp_path / "gpu_check.log").read_text()
    assert "dry run: no device checks" in log  # the gate imported kvfast and kvfast._C_cuda's stand-in checks
    first_run = log.split("=== first-run (cap")[1].split("=== first-run:")[0]
    assert int(re.search(r"(\d+) tests? collected", first_run).group(1)) >= 10, first_run[-500:]
    assert "usage: bench_codec.py" in log and "usage: bench_load_gpu.py" in log
    assert "(dry run)" in (tmp_path / "summary.txt").read_text()
    assert len(list(tmp_path.rglob("*"))) <= MAX_FILES_BACK


def test_steps_past_the_budget_are_skipped_with_a_line(tmp_path):
    done = run(tmp_path, "--dry-run", KVFAST_GPU_CHECK_BUDGET="0")
    assert done.returncode == 0, done.stdout[-3000:]
    rows = summary_rows(tmp_path)
    assert set(rows) == set(STEPS) and all(r.startswith("skipped (budget: ") for r in rows.values()), rows


def test_a_failed_gate_stops_the_run(tmp_path):
    done = run(tmp_path, "--dry-run", "--no-build", PYTHON="false")
    assert done.returncode == 1
    rows = summary_rows(tmp_path)
    assert rows == {"build": "not run (--no-build)", "gate": "FAILED (exit 1)"}, rows
    assert "=== gate failed: the remaining steps would not test what they claim; stopping" in done.stdout


def test_unknown_options_are_refused(tmp_path):
    done = run(tmp_path, "--dryrun")
    assert done.returncode == 2 and "usage: bash bench/gpu_check.sh" in done.stderr


def test_optional_codec_baselines_are_skipped_with_a_line_when_absent():
    code = ("import sys; sys.modules['lz4'] = sys.modules['lz4.frame'] = sys.modules['zstandard'] = None; "
            "sys.path.insert(0, 'bench'); import torch, bench_codec as b; "
            "keys = [torch.randn(64, 2, 16).to(torch.bfloat16)]; rows = b.ratio_rows('m', keys, keys); "
            "print(sorted(rows[0])); print(*b.missing_baselines(), sep='\\n')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "expcode-v2" in done.stdout and "zstd-19" not in done.stdout and "'lz4'" not in done.stdout
    assert "bench_codec: zstandard is not installed: its baseline columns are skipped" in done.stdout
    assert "bench_codec: lz4 is not installed: its baseline columns are skipped" in done.stdout


@pytest.mark.parametrize("require, ok, message", [
    ("cuda", False, "KVFAST_REQUIRE_NATIVE=cuda, but nvcc was found neither"),
    ("1", True, "kvfast._C_cuda (the CUDA load path and kernels) is not built"),
    ("yes", False, "KVFAST_REQUIRE_NATIVE must be unset, 0, 1 or cuda"),
])
def test_setup_without_nvcc(tmp_path, require, ok, message):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=str(tmp_path), KVFAST_REQUIRE_NATIVE=require)  # a PATH without nvcc
    done = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-2000:]
    assert message in done.stderr
    if ok:
        assert done.stdout.strip().splitlines()[-1] == "kvfast"
