"""Which Hugging Face tensors belong to the language model, under one canonical key.

Checkpoints spell the language model differently: Qwen3 and Qwen-Merge use `model.layers.*`,
`model.norm`, `model.embed_tokens`, `lm_head`; the Qwen2.5-VL hub layout uses the same names
next to `visual.*`; transformers' in-memory Qwen2.5-VL uses `model.language_model.*`. The
canonical key (`layers.3.mlp.up_proj.weight`, `norm.weight`, `embed_tokens.weight`,
`lm_head.weight`) lets a VLM be merged with a text-only LLM. Everything else (the ViT, the
projector `visual.merger.*`) is not language model and is never merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BODY = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)"
                   r"(layers\.(\d+)\..+|norm\.weight|embed_tokens\.weight)$")
_HEAD = re.compile(r"^(?:language_model\.)?lm_head\.weight$")


@dataclass(frozen=True)
class LMTensor:
    key: str  # canonical name, the same in every layout
    role: str  # "layer", "final_norm", "embedding" or "output"
    layer: int | None = None


def classify(name: str) -> LMTensor | None:
    """The language-model identity of a checkpoint tensor, or None for vision/projector/other."""
    if _HEAD.match(name):
        return LMTensor("lm_head.weight", "output")
    m = _BODY.match(name)
    if m is None:
        return None
    key, layer = m.group(1), m.group(2)
    if layer is not None:
        return LMTensor(key, "layer", int(layer))
    return LMTensor(key, "final_norm" if key == "norm.weight" else "embedding")


def lm_tensors(names) -> dict[str, str]:
    """canonical key -> checkpoint name for every language-model tensor among `names`."""
    out: dict[str, str] = {}
    for name in names:
        t = classify(name)
        if t is None:
            continue
        if t.key in out:
            raise ValueError(f"two tensors map to the language-model key {t.key}: {out[t.key]} and {name}")
        out[t.key] = name
    return out


def parse_layers(text: str) -> frozenset[int]:
    """'0-5,8,10-11' -> {0,1,2,3,4,5,8,10,11}."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"cannot read layer range {part!r} in {text!r}; use e.g. 0-5,8")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"empty layer range {part!r}")
        layers.update(range(lo, hi + 1))
    if not layers:
        raise ValueError(f"no layers in {text!r}")
    return frozenset(layers)
