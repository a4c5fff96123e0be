"""Run one vLLM engine on token-id prompts and write what it produced as JSON (a real process per engine).

    python tests/vllm/engine_run.py SPEC.json OUT.json
    python tests/vllm/engine_run.py --serve SPEC.json FD   (bench/bench_vllm.py: prompts from stdin, one JSON
                                                           list of ids a line; each reply a JSON line on file
                                                           descriptor FD, which vLLM's logging never writes)

SPEC: {"model": dir, "dtype": "float32", "kv": null or kv_transfer_config dict, "kv_cache_dtype": "auto",
       "prefix_caching": true, "max_num_batched_tokens": null (vLLM's default) or tokens per step,
       "prompts": [[ids], ...], "max_tokens": 32, "logprobs": 5, "inproc": false, "batch": false}
OUT:  {"start_s": s, "results": [{"tokens", "logprobs": [{id: logprob}], "kv_transfer_params", "wall_s"}],
       with "inproc" (the engine core runs in this process), after the engine has stepped until it holds no
       request (held ones wait for their background save): "outcomes_held" (outcomes and saves its kvfast
       connector still holds: each must go with its request), "requests_held" (requests vLLM still holds),
       "free_blocks" and "usable_blocks" (vLLM's free KV blocks, and all it has)}

Prompts run one after another (one ``generate`` each), so each request's wall time is its own and later
prompts see what earlier ones published; with "batch", all in one ``generate`` (batched in the same steps).
The engine spawns processes: hence the ``__main__`` guard.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def start(spec: dict) -> tuple[Any, Any, float]:
    """(the engine, its sampling parameters, seconds it took to start)."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), skip_tokenizer_init=True, seed=0,
              max_model_len=spec.get("max_model_len", 4096), kv_transfer_config=spec.get("kv"),
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
              enable_prefix_caching=spec.get("prefix_caching", True), enforce_eager=True,
              max_num_batched_tokens=spec.get("max_num_batched_tokens"))
    params = SamplingParams(max_tokens=spec.get("max_tokens", 32), temperature=0.0, ignore_eos=True,
                            logprobs=spec.get("logprobs"), detokenize=False)
    return llm, params, time.perf_counter() - t0


def generate(llm: Any, params: Any, group: list[list[int]]) -> list[dict]:
    """Run ``group`` in one ``generate``: per prompt its tokens, log-probabilities, transfer params, wall time."""
    from vllm.inputs import TokensPrompt

    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in group], params, use_tqdm=False)
    wall = time.perf_counter() - t
    results = []
    for out in outs:
        completion = out.outputs[0]
        logprobs = [{str(tok): lp.logprob for tok, lp in step.items()} for step in completion.logprobs or []]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs,
                        "kv_transfer_params": out.kv_transfer_params, "wall_s": wall})
    return results


def run(spec: dict) -> dict:
    llm, params, start_s = start(spec)
    groups = [spec["prompts"]] if spec.get("batch") else [[ids] for ids in spec["prompts"]]
    out = {"start_s": start_s, "results": [r for group in groups for r in generate(llm, params, group)]}
    if spec.get("inproc"):
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        deadline = time.monotonic() + 120
        while scheduler.has_requests() and time.monotonic() < deadline:  # finished requests held for their save
            llm.llm_engine.step()
            time.sleep(0.01)
        out["outcomes_held"] = scheduler.connector._scheduler.outcomes_held()  # noqa: SLF001 - what tests check
        out["requests_held"] = len(scheduler.requests)
        pool = scheduler.kv_cache_manager.block_pool
        out["free_blocks"], out["usable_blocks"] = pool.get_num_free_blocks(), pool.num_gpu_blocks - 1
    return out


def serve(spec: dict, fd: int) -> None:
    """Start the engine, then one prompt per stdin line until stdin closes; replies as JSON lines on ``fd``."""
    replies = os.fdopen(fd, "w")
    llm, params, start_s = start(spec)
    print(json.dumps({"start_s": start_s}), file=replies, flush=True)
    for line in sys.stdin:
        print(json.dumps(generate(llm, params, [json.loads(line)])[0]), file=replies, flush=True)


if __name__ == "__main__":
    serving = sys.argv[1] == "--serve"
    spec_path = sys.argv[2] if serving else sys.argv[1]
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("inproc"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if serving:
        serve(spec, int(sys.argv[3]))
    else:
        result = run(spec)
        with open(sys.argv[2], "w") as f:
            json.dump(result, f)
