"""Run one vLLM engine on token-id prompts and write what it produced as JSON (a real process per engine).

    python tests/vllm/engine_run.py SPEC.json OUT.json

SPEC: {"model": dir, "dtype": "float32", "kv": null or kv_transfer_config dict, "kv_cache_dtype": "auto",
       "prefix_caching": true, "max_num_batched_tokens": null (vLLM's default) or tokens per step,
       "prompts": [[ids], ...], "max_tokens": 32, "logprobs": 5, "inproc": false}
OUT:  {"start_s": s, "results": [{"tokens", "logprobs": [{id: logprob}], "kv_transfer_params", "wall_s"}],
       "outcomes_held": n (with "inproc": the engine core runs in this process, and this counts the outcomes its
       kvfast connector still holds after the last request: each must go with its request)}

Prompts run one after another (one ``generate`` each), so each request's wall time is its own and later
prompts see what earlier ones published. The engine spawns processes: hence the ``__main__`` guard.
"""
from __future__ import annotations

import json
import os
import sys
import time


def run(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "float32"), skip_tokenizer_init=True, seed=0,
              max_model_len=spec.get("max_model_len", 4096), kv_transfer_config=spec.get("kv"),
              kv_cache_dtype=spec.get("kv_cache_dtype", "auto"),
              enable_prefix_caching=spec.get("prefix_caching", True), enforce_eager=True,
              max_num_batched_tokens=spec.get("max_num_batched_tokens"))
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=spec.get("max_tokens", 32), temperature=0.0, ignore_eos=True,
                            logprobs=spec.get("logprobs"), detokenize=False)
    results = []
    for ids in spec["prompts"]:
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        completion = out.outputs[0]
        logprobs = [{str(tok): lp.logprob for tok, lp in step.items()} for step in completion.logprobs or []]
        results.append({"tokens": list(completion.token_ids), "logprobs": logprobs,
                        "kv_transfer_params": out.kv_transfer_params, "wall_s": wall})
    out = {"start_s": start_s, "results": results}
    if spec.get("inproc"):
        connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
        out["outcomes_held"] = len(connector._scheduler._outcome)  # noqa: SLF001 - what the test is about
    return out


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("inproc"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    result = run(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
