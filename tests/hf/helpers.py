"""Prompts and the transformers greedy generation shared by the HF and vLLM tests."""

from __future__ import annotations

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
