"""Options of the pytest-benchmark suite in bench/ (``pytest bench --benchmark-only``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conftest (the tiny models), under plain `pytest`


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-size", choices=("small", "full"), default="full",
                     help="full: the headline shapes (Qwen3-0.6B's KV, 4096 tokens); small: the same cases on a "
                          "few MB, for CI to check the suite runs")


@pytest.fixture(scope="session")
def bench_size(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--bench-size")
