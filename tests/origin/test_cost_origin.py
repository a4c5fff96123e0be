"""kvfast cost's origin row: a node's first fetch of the document = its KV bytes over the origin's bandwidth."""
from __future__ import annotations

import json

import pytest

from kvfast import cost
from kvfast.cli import main
from kvfast.configs import get_config

BANDWIDTHS = (0.1e9, 1.25e9, 12.5e9)


@pytest.mark.parametrize("bytes_per_s", BANDWIDTHS)
def test_origin_fetch_is_kv_bytes_over_bandwidth(bytes_per_s):
    shape = cost.ModelShape.from_config(get_config("qwen3-0.6b"), name="qwen3-0.6b")
    r = cost.estimate(shape, 4096, origin_bytes_per_s=bytes_per_s)
    assert r.kv_bytes == 28 * 4096 * 2 * 8 * 128 * 2  # Qwen3-0.6B: 470 MB of bf16 KV
    assert r.origin_fetch_s == pytest.approx(r.kv_bytes / bytes_per_s)
    assert r.origin_fetch_vs_prefill == pytest.approx(r.origin_fetch_s / r.prefill_s)


def test_cli_prints_the_origin_row(capsys):
    assert main(["cost", "--model", "qwen3-0.6b", "--tokens", "4096", "--origin-gb-per-s", "0.5"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "first fetch from origin" in line)
    assert "940 ms at 0.5 GB/s" in row
    assert main(["cost", "--model", "qwen3-0.6b", "--tokens", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["origin_bytes_per_s"] == cost.DEFAULT_ORIGIN_BYTES_PER_S
