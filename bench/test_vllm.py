"""bench_vllm.py as pytest-benchmark cases: kvfast's TTFT inside vLLM, timed beside vLLM's prefix-cache hit and
ExampleConnector in the same engines (bench_vllm.Engine: one process each, pinned to the same cores).

    .venv-vllm/bin/python -m pytest bench/test_vllm.py --benchmark-only                    # Qwen3-0.6B shape, 4096
    .venv-vllm/bin/python -m pytest bench/test_vllm.py --benchmark-only --bench-size small  # 2 layers, 512 tokens

Each case times one path with pytest-benchmark (``generate(max_tokens=1)`` of document + question, median of 5
rounds) and the baseline in the same test, and records both and their ratio in ``extra_info``. Skipped where vLLM
is not installed.
"""
from __future__ import annotations

import importlib.util
import random
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # bench_vllm, report

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed here (README: Serving with vLLM)", allow_module_level=True)

from test_headline import median_seconds  # noqa: E402
from bench_vllm import QUESTION, make_checkpoint, start_engines, wait_published  # noqa: E402

SIZES = {"full": (28, 4096), "small": (2, 512)}  # layers, document tokens
ROUNDS = 5
VOCAB = 151_936


@pytest.fixture(scope="module")
def served(bench_size):
    layers, size = SIZES[bench_size]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_checkpoint(workdir / "model", layers)
        engines, fingerprint = start_engines(workdir, "0-1", size + 2 * QUESTION + 16)
        try:
            rng = random.Random(0)
            doc = [rng.randrange(3, VOCAB) for _ in range(size)]
            first = doc + [rng.randrange(3, VOCAB) for _ in range(QUESTION)]
            for engine in engines.values():  # publish (connectors), warm the prefix cache (plain)
                engine.run(first)
            wait_published(workdir / "store", fingerprint, first)
            yield engines, doc + [rng.randrange(3, VOCAB) for _ in range(QUESTION)]
        finally:
            for engine in engines.values():
                engine.close()


@pytest.mark.parametrize("baseline", ["plain", "example"])
def test_kvfast_ttft(benchmark, served, baseline):
    """kvfast's load against the prefix-cache hit ("plain" engine, warm) and against ExampleConnector's load."""
    engines, prompt = served
    base_s = median_seconds(lambda: engines[baseline].run(prompt), ROUNDS)
    result = benchmark.pedantic(engines["kvfast"].run, args=(prompt,), rounds=ROUNDS, warmup_rounds=1)
    assert (result["kv_transfer_params"] or {}).get("kvfast_supplied_tokens", 0) > 0
    kvfast_s = benchmark.stats.stats.median
    name = "vLLM prefix-cache hit" if baseline == "plain" else "vLLM ExampleConnector load"
    benchmark.extra_info.update(baseline=name, baseline_s=base_s, ratio=kvfast_s / base_s,
                                target=1.15 if baseline == "plain" else 0.8)
