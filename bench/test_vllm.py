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
from bench_vllm import engine_specs, publish, started, wait_published  # noqa: E402

import kvfast  # noqa: E402

SIZES = {"full": (28, 4096), "small": (2, 512)}  # layers, document tokens
ROUNDS = 5


@pytest.fixture(scope="module")
def served(bench_size):
    """The plain (+ prefix hit), example and kvfast consumer engines, and a prompt whose document each holds."""
    import torch

    from bench_vllm import QUESTION, make_checkpoint, tokens

    layers, size = SIZES[bench_size]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_checkpoint(workdir / "model", layers)
        fingerprint = kvfast.checkpoint_fingerprint(workdir / "model", dtype=torch.bfloat16)
        specs = engine_specs(workdir, fingerprint, size + 2 * QUESTION + 16)
        rng = random.Random(0)
        engines = {name: started(name, specs[name], workdir, "0-1", rng) for name in ("plain", "example", "publisher")}
        try:
            doc, _ = publish(engines, size, rng)
            wait_published(workdir / "store", fingerprint, doc)
            engines.pop("publisher").close()
            engines["kvfast"] = started("kvfast", specs["kvfast"], workdir, "0-1", rng)
            yield engines, doc + tokens(rng, QUESTION)
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
