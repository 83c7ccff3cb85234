"""Refuse to merge language models that do not line up, and say exactly where they differ.

Checked across every input (the models and the base): the structural fields of the language
model config, the set of language-model tensors and their shapes (this catches different
architectures, depths and vocabulary sizes), and the tokenizer vocabularies (equal sizes with
different token ids would merge rows that mean different tokens). All problems are collected
and reported together.

Tied and untied models (Qwen3's small sizes tie `lm_head` to `embed_tokens`): their layers and
norms merge in either order, embeddings and lm_head coming from the first model; merging the
embeddings too (`--include-embeddings`) is refused, whichever model comes first, since a tied
output has no separate lm_head to hold the untied models' share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..checkpoint.safetensors_io import SafetensorsFolder, preview
from ..hf_config import text_section

# Fields that decide the language model's tensor shapes and how they are used.
STRUCTURAL_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "vocab_size", "hidden_act")


class MergeValidationError(ValueError):
    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("models cannot be merged:\n  - " + "\n  - ".join(self.problems))


def text_config(folder: Path) -> dict:
    """The language-model part of config.json (`text_config` for VLMs, the top level otherwise)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; is this a Hugging Face model folder?")
    return text_section(json.loads(path.read_text()))


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = dict(data.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def check_compatible(folders: Sequence[Path], readers: Sequence[SafetensorsFolder],
                     lm_maps: Sequence[dict[str, str]], merged_keys: set[str]) -> None:
    """Raise MergeValidationError listing every mismatch of folders[1:] against folders[0].

    lm_maps: per input, canonical language-model key -> checkpoint name.
    merged_keys: the canonical keys that will be merged (must exist in every input).
    """
    problems: list[str] = []
    ref, ref_cfg, ref_vocab = folders[0], text_config(folders[0]), tokenizer_vocab(folders[0])
    if not merged_keys:
        problems.append(f"{ref}: no language-model tensors (model.layers.*, model.norm) found")
    tie_problem = _tie_mismatch(folders, lm_maps) if "embed_tokens.weight" in merged_keys else None
    if tie_problem:
        problems.append(tie_problem)
    for folder, reader, lm in zip(folders[1:], readers[1:], lm_maps[1:]):
        cfg = text_config(folder)
        fields = [f"{k}: {ref_cfg[k]} vs {cfg[k]}" for k in STRUCTURAL_FIELDS
                  if k in ref_cfg and k in cfg and ref_cfg[k] != cfg[k]]
        if fields:
            problems.append(f"{folder}: language-model config differs from {ref}: {'; '.join(fields)}")
        missing = sorted(merged_keys - lm.keys() - ({"lm_head.weight"} if tie_problem else set()))
        if missing:
            problems.append(f"{folder}: lacks {len(missing)} language-model tensors that {ref} has: "
                            f"{preview(missing)}")
        extra = sorted(k for k in lm.keys() - lm_maps[0].keys() if k != "lm_head.weight")
        if extra:
            problems.append(f"{folder}: has {len(extra)} language-model tensors that {ref} lacks: {preview(extra)}")
        # Embeddings are compared even when they are not merged: their shape is the vocabulary.
        shared = sorted(lm.keys() & lm_maps[0].keys())
        shapes = [f"{k} {readers[0].spec(lm_maps[0][k]).shape} vs {reader.spec(lm[k]).shape}" for k in shared
                  if readers[0].spec(lm_maps[0][k]).shape != reader.spec(lm[k]).shape]
        if shapes:
            problems.append(f"{folder}: {len(shapes)} tensor shapes differ from {ref}: {preview(shapes)}")
        vocab = tokenizer_vocab(folder)
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            differ = sorted(t for t in ref_vocab.keys() | vocab.keys() if ref_vocab.get(t) != vocab.get(t))
            problems.append(f"{folder}: tokenizer vocabulary differs from {ref} in {len(differ)} tokens: "
                            f"{preview([repr(t) for t in differ])}")
    if problems:
        raise MergeValidationError(problems)


def _tie_mismatch(folders: Sequence[Path], lm_maps: Sequence[dict[str, str]]) -> str | None:
    """The problem when some inputs tie lm_head to embed_tokens (store no lm_head) and others do not."""
    tied = [str(f) for f, lm in zip(folders, lm_maps) if "lm_head.weight" not in lm]
    untied = [str(f) for f, lm in zip(folders, lm_maps) if "lm_head.weight" in lm]
    if not tied or not untied:
        return None
    return (f"--include-embeddings merges embed_tokens and lm_head, but {', '.join(tied)} tie lm_head to "
            f"embed_tokens and {', '.join(untied)} do not; merge without --include-embeddings (embeddings and "
            "lm_head then come from the first model)")
