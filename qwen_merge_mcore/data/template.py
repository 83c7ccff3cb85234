"""Conversation -> token ids and a loss mask, through the packaged Jinja chat templates.

Tokenising with transformers' `apply_chat_template` on the same template file that exported
checkpoints carry makes the training ids identical to what inference builds; the template's
`{% generation %}` blocks give the assistant-token mask (loss only on what the assistant writes:
its optional `<think>` block, the answer and `<|im_end|>`).

- `pretrain` (stages 1-2): `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n`,
  no system prompt, reasoning dropped.
- `qwen3` (stage 3): Qwen3's thinking ChatML. The final answer always gets a think block (empty
  `<think>\\n\\n</think>\\n\\n` when the data has none); a turn whose user message contains `/no_think`
  is trained with an empty think block, whatever reasoning the row carries.

One `<|image_pad|>` per image in the template output is then expanded to one per merged patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..templates import chat_template
from .errors import BadSample
from .sample import Sample

TEMPLATE_FILES = {"pretrain": "pretrain", "qwen3": "qwen3_vl"}
_PLACEHOLDER = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                "video": "<|vision_start|><|video_pad|><|vision_end|>"}


@dataclass
class Encoded:
    input_ids: list[int]
    target_mask: list[int]  # 1 where the token is written by the assistant (a training target)


class ChatEncoder:
    def __init__(self, tokenizer, template: str, image_token_id: int, video_token_id: int):
        if template not in TEMPLATE_FILES:
            raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATE_FILES)}")
        self.tokenizer, self.template_name = tokenizer, template
        self.template = chat_template(TEMPLATE_FILES[template])
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        for tok, tid in (("<|image_pad|>", image_token_id), ("<|video_pad|>", video_token_id)):
            if tokenizer.convert_tokens_to_ids(tok) != tid:
                raise ValueError(f"tokenizer maps {tok} to {tokenizer.convert_tokens_to_ids(tok)}, "
                                 f"the model config says {tid}")

    def chat_messages(self, sample: Sample) -> list[dict]:
        """The messages as the template takes them (string content with vision placeholders)."""
        out = []
        no_think = False
        for m in sample.messages:
            content = "".join(p.text if p.type == "text" else _PLACEHOLDER[p.type] for p in m.parts)
            if m.role == "user":
                no_think = "/no_think" in content
            msg = {"role": m.role, "content": content}
            if m.role == "assistant" and self.template_name == "qwen3":
                msg["reasoning_content"] = "" if no_think else (m.reasoning or "")
            out.append(msg)
        return out

    def encode(self, sample: Sample, image_tokens: Sequence[int], video_tokens: Sequence[int]) -> Encoded:
        """`image_tokens[i]`: merged patches of image i (placeholders it expands to)."""
        enc = self.tokenizer.apply_chat_template(
            self.chat_messages(sample), chat_template=self.template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        counts = {self.image_token_id: list(image_tokens), self.video_token_id: list(video_tokens)}
        out_ids, out_mask = [], []
        used = {self.image_token_id: 0, self.video_token_id: 0}
        for tok, m in zip(ids, mask):
            if tok in counts:
                if used[tok] >= len(counts[tok]):
                    raise BadSample("image_token_mismatch", f"more {_name(tok, self)} placeholders in the "
                                    f"text than {_name(tok, self)}s ({len(counts[tok])})")
                n = counts[tok][used[tok]]
                used[tok] += 1
                out_ids.extend([tok] * n)
                out_mask.extend([0] * n)
            else:
                out_ids.append(tok)
                out_mask.append(m)
        for tok, n in used.items():
            if n != len(counts[tok]):
                raise BadSample("image_token_mismatch", f"{len(counts[tok])} {_name(tok, self)}s but {n} "
                                f"placeholders in the text")
        if not any(out_mask):
            raise BadSample("malformed_row", "no assistant tokens to train on")
        return Encoded(out_ids, out_mask)


def _name(tok: int, enc: ChatEncoder) -> str:
    return "image" if tok == enc.image_token_id else "video"

