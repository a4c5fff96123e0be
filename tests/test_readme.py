"""Every Python snippet of README.md runs as written, in order (later sections build on earlier ones), on a tiny
real model, and does what its prose says. The vLLM snippet needs vllm and is covered by tests/vllm."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kvfast
from kvfast.hf.capture import prefill
from kvfast.hf.generate import decode
from tests.conftest import random_ids, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [b for b in blocks if "from vllm" not in b]


def test_the_readme_has_the_snippets_this_test_checks():
    starts = [s.splitlines()[0] for s in python_snippets()]
    assert len(starts) == 5, starts
    assert starts[0] == "import kvfast" and starts[1].startswith("cfg = model.config") and "load_async" in starts[2]
    assert starts[3].startswith("store = kvfast.Store(") and starts[4] == "import secrets"


def test_readme_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama", torch.float32)
    doc_ids, question_ids = random_ids(300, seed=7), random_ids(12, seed=8)
    ns = {"model": model, "doc_ids": doc_ids, "question_ids": question_ids, "prompt_ids": doc_ids + question_ids,
          "torch": torch}
    api, load_into, load_async, store, trust = python_snippets()

    exec(compile(api, "README.md: Python API", "exec"), ns)
    # token-exact: the tokens after the loaded document are those after a fresh prefill of it
    fresh = decode(model, prefill(model, doc_ids), question_ids, max_new_tokens=32)
    assert ns["out"].tokens == fresh.tokens and torch.equal(ns["out"].logits, fresh.logits)
    assert ns["cache"].num_used_blocks == 0  # the snippet's own assert, checked here too: no fork leaks

    exec(compile(load_into, "README.md: pages you own", "exec"), ns)
    keys, values = kvfast.capture_kv(model, doc_ids)
    for layer in range(len(keys)):  # the engine's pages hold the document at the blocks it named
        k, v = ns["pages"].gather(layer, ns["block_ids"], len(doc_ids))
        assert torch.equal(k, keys[layer]) and torch.equal(v, values[layer])

    exec(compile(load_async, "README.md: asynchronous loads", "exec"), ns)
    k, v = ns["cache"].gather(ns["seq"], 0)
    assert torch.equal(k, keys[0]) and torch.equal(v, values[0])
    ns["cache"].free(ns["seq"])

    exec(compile(store, "README.md: Provider-side store", "exec"), ns)
    match, n, block = ns["match"], ns["n"], ns["store"].block_tokens
    # the prose: a multiple of the block size, or a whole stored document the prompt starts with
    assert match.num_tokens % block == 0 or match.num_tokens == match.entry.num_tokens
    assert match.num_tokens == n == len(doc_ids)  # here the prompt starts with the whole 300-token document
    rest = decode(model, prefill(model, doc_ids[:n]), ns["prompt_ids"][n:], max_new_tokens=32)
    assert ns["out"].tokens == rest.tokens
    short = ns["store"].match(model, doc_ids[:100] + question_ids)  # a prompt sharing part of the document
    assert short.num_tokens == 100 // block * block

    exec(compile(trust, "README.md: Trust across parties", "exec"), ns)
    assert ns["report"].ok and Path("doc.kvf.sig").is_file()
    with pytest.raises(kvfast.SignatureError):  # "refuses anything else": an unsigned copy
        Path("copy.kvf").write_bytes(Path("doc.kvf").read_bytes())
        kvfast.load("copy.kvf", ns["cache"], model=model, trusted_keys=["publisher.key.pub"])


def test_ci_runs_the_readme_test_command_and_the_package_pins_nothing():
    root = README.parent
    bash = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    install, test = bash[0].strip(), bash[1].strip()
    assert install.endswith("kvfast demo") and "-c constraints/cpu.txt" in install
    assert test.endswith("python -m pytest") and test in (root / ".ci" / "run").read_text().splitlines()
    # the CPU pin lives in the constraints file the commands use, never in the package's own dependencies
    assert "torch==" in (root / "constraints" / "cpu.txt").read_text()
    pyproject = (root / "pyproject.toml").read_text()
    dependencies = pyproject[pyproject.index("dependencies = ["):pyproject.index("[project.optional-dependencies]")]
    assert '"torch>=' in dependencies and "torch==" not in dependencies
