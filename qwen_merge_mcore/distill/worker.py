"""The offline vLLM engine, run as `python -m qwen_merge_mcore.distill.worker` under an
interpreter where vLLM imports (`.venv-vllm`); imports only the standard library and vLLM.

Protocol, one JSON object per line: stdin gets the engine options first, then batches
`{"requests": [...]}`; the protocol channel (the original stdout) answers `{"ready": ...}` once
and `{"replies": [...]}` per batch. vLLM's own logging goes to stderr. A request is
`{"key", "messages", "thinking", "params"}`; a reply `{"key", "text", "finish_reason",
"prompt_token_ids", "output_tokens"}`. Replies carry their request's key: LLM.chat returns
outputs in input order, and the key travels with each position.
"""

from __future__ import annotations

import json
import os
import sys


def _serve(proto, engine: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(**engine)
    name = engine.get("served_model_name") or os.path.basename(os.path.normpath(engine["model"]))
    proto.write(json.dumps({"ready": True, "name": name}) + "\n")
    proto.flush()
    for line in sys.stdin:  # EOF: the parent is gone or done
        batch = json.loads(line)
        replies = []
        # chat_template_kwargs apply to a whole LLM.chat call: one call per thinking switch.
        for thinking in (True, False):
            group = [r for r in batch["requests"] if r["thinking"] == thinking]
            if not group:
                continue
            outputs = llm.chat([r["messages"] for r in group], [SamplingParams(**r["params"]) for r in group],
                               use_tqdm=batch.get("progress", False),
                               chat_template_kwargs={"enable_thinking": thinking})
            for request, output in zip(group, outputs, strict=True):
                completion = output.outputs[0]
                replies.append({"key": request["key"], "text": completion.text,
                                "finish_reason": completion.finish_reason or "unknown",
                                "prompt_token_ids": list(output.prompt_token_ids or []),
                                "output_tokens": len(completion.token_ids)})
        proto.write(json.dumps({"replies": replies}) + "\n")
        proto.flush()


def main() -> None:
    # The protocol owns the original stdout; everything else printed (vLLM logs) goes to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    engine = json.loads(sys.stdin.readline())
    try:
        _serve(proto, engine)
    except Exception as exc:  # the parent prints it as the one line the user sees
        proto.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        proto.flush()
        raise SystemExit(1)


if __name__ == "__main__":
    main()
