"""A teacher reply -> an output row in the training format (`llamafactory` layout: `messages`
with `<image>` tags, `images` paths relative to the output folder, reasoning in the assistant's
`reasoning_content`), with the distillation fields beside it."""

from __future__ import annotations

from typing import Optional

from ..data.formats import _split_think
from .backends import Reply
from .questions import Question
from .sampling import Mode

# The Qwen3 soft switch in the user turn: `data.template: qwen3` trains such a turn with an empty
# think block, and the trained model learns that `/no_think` means answer directly.
NO_THINK_TAG = " /no_think"


def split_reply(text: str, mode: Mode) -> tuple[Optional[str], str, Optional[str]]:
    """(reasoning, answer, drop reason or None), split at `</think>`."""
    reasoning, answer = _split_think(text)
    if reasoning is None and "<think>" in text:
        return None, "", "unclosed_think"
    reasoning = (reasoning or "").strip() if mode.thinking else ""
    answer = answer.strip()
    return reasoning, answer, None if answer else "empty_answer"


def to_row(q: Question, mode: Mode, reply: Reply, reasoning: str, answer: str, teacher: str, seed: int) -> dict:
    user = "".join("<image>" if kind == "image" else value for kind, value in q.parts)
    messages = [{"role": "system", "content": q.system}] if q.system else []
    messages += [{"role": "user", "content": user + ("" if mode.thinking else NO_THINK_TAG)},
                 {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
    return {"id": q.id, "mode": mode.name, "messages": messages, "images": q.images, "question": q.text,
            "reference": q.reference, "score": q.score, "reasoning": reasoning, "answer": answer,
            "teacher": teacher, "seed": seed, "finish_reason": reply.finish_reason,
            "output_tokens": reply.output_tokens}
