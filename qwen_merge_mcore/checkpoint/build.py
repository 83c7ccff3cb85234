"""Build the Qwen-Merge Hugging Face checkpoint from a Qwen2.5-VL (for `visual.*`) and a Qwen3 LLM.

Streams tensor by tensor: every output tensor is read, cast and written at its place in the
output shard before the next is read, so building on the 72B VLM needs memory for one tensor.
The VLM's own language model is dropped; the new projector layer `visual.merger.mlp.4` is
initialised N(0, init_std) with bias 0 from a seeded generator.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..dtypes import HF_NAMES, torch_dtype
from ..hf_config import head_dim, hf_dtype_name, rope_section, text_section
from ..templates import chat_template
from ..utils.atomic import atomic_output_dir, check_output_not_input
from .hf_shapes import check_shapes, qwen2_5_vl_vision_shapes, qwen3_shapes
from .safetensors_io import CheckpointError, SafetensorsFolder, ShardedSafetensorsWriter, TensorSpec

MERGE_MODEL_TYPE = "qwen2_5_vl_merge"
MERGE_ARCHITECTURE = "Qwen2_5_VL_MergeForConditionalGeneration"
NEW_LAYER = "visual.merger.mlp.4"
TOKEN_ID_NAMES = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                  "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
# Bookkeeping keys of a config that do not describe the model.
_DROP = ("architectures", "auto_map", "transformers_version", "_name_or_path")


@dataclass
class BuildResult:
    out: Path
    tensors: int
    bytes: int


def read_config(folder: Path, expect: str) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (expected a {expect} checkpoint folder)")
    return json.loads(path.read_text())


def merged_config(vlm: dict, llm: dict, dtype: str | None) -> dict:
    """config.json of the Qwen-Merge checkpoint (the naming contract is in docs/converters.md)."""
    if vlm.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(f"--vlm must be a Qwen2.5-VL checkpoint (model_type qwen2_5_vl), "
                              f"got model_type {vlm.get('model_type')!r}")
    if llm.get("model_type") != "qwen3":
        raise CheckpointError(f"--llm must be a Qwen3 checkpoint (model_type qwen3), "
                              f"got model_type {llm.get('model_type')!r}")
    mrope = rope_section(text_section(vlm)).get("mrope_section") or rope_section(vlm).get("mrope_section")
    if not mrope or len(mrope) != 3:
        raise CheckpointError(f"the VLM config has no 3-part rope mrope_section (got {mrope!r})")
    if sum(mrope) * 2 != head_dim(llm):
        raise CheckpointError(f"the VLM's mrope_section {mrope} covers {sum(mrope) * 2} rotary dims, but the "
                              f"LLM's head_dim is {head_dim(llm)}: these parts cannot be merged")
    text = {k: v for k, v in llm.items() if k not in _DROP}
    rope = rope_section(llm)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if "rope_theta" not in rope:
        rope["rope_theta"] = llm.get("rope_theta", 1_000_000.0)
    rope["mrope_section"] = list(mrope)
    text["rope_parameters"] = rope
    text.pop("rope_scaling", None)
    vision = {k: v for k, v in vlm["vision_config"].items() if k not in _DROP}
    vision["out_hidden_size2"] = llm["hidden_size"]
    cfg = {"architectures": [MERGE_ARCHITECTURE], "model_type": MERGE_MODEL_TYPE,
           "text_config": text, "vision_config": vision,
           "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False))}
    for name in TOKEN_ID_NAMES:
        if name not in vlm:
            raise CheckpointError(f"the VLM config has no {name}")
        cfg[name] = vlm[name]
    cfg["dtype"] = HF_NAMES[dtype] if dtype else hf_dtype_name(llm)
    return cfg


def check_token_ids(llm_dir: Path, cfg: dict) -> None:
    """The VLM's vision token ids must name the same tokens in the LLM's vocabulary (no resize)."""
    tok_path = llm_dir / "tokenizer.json"
    if not tok_path.exists():
        raise CheckpointError(f"{llm_dir}: no tokenizer.json (the merged model uses the LLM's tokenizer)")
    tok = json.loads(tok_path.read_text())
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    ids.update({k: v for k, v in tok.get("model", {}).get("vocab", {}).items() if k in TOKEN_ID_NAMES.values()})
    wrong = [f"{name}={cfg[name]} but the LLM tokenizer has {token!r} at {ids.get(token)}"
             for name, token in TOKEN_ID_NAMES.items() if ids.get(token) != cfg[name]]
    if wrong:
        raise CheckpointError("vision token ids of the VLM do not match the LLM tokenizer: " + "; ".join(wrong))


def build_qwen_merge(vlm_dir: str | Path, llm_dir: str | Path, out: str | Path, overwrite: bool = False,
                     dtype: str | None = None, seed: int = 0, init_std: float = 0.02,
                     max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> BuildResult:
    vlm_dir, llm_dir = Path(vlm_dir), Path(llm_dir)
    check_output_not_input(out, [vlm_dir, llm_dir])
    vlm_cfg, llm_cfg = read_config(vlm_dir, "Qwen2.5-VL"), read_config(llm_dir, "Qwen3")
    cfg = merged_config(vlm_cfg, llm_cfg, dtype)
    check_token_ids(llm_dir, cfg)
    vlm, llm = SafetensorsFolder(vlm_dir), SafetensorsFolder(llm_dir)
    vis_shapes = qwen2_5_vl_vision_shapes(vlm_cfg["vision_config"])
    llm_shapes = qwen3_shapes(llm_cfg)
    check_shapes(vlm, vis_shapes, "Qwen2.5-VL vision part")
    check_shapes(llm, llm_shapes, "Qwen3")
    extra = sorted(n for n in vlm.names() if n.startswith("visual.") and n not in vis_shapes)
    extra += sorted(n for n in llm.names() if n not in llm_shapes and not
                    (n == "lm_head.weight" and cfg["tie_word_embeddings"]))
    if extra:
        raise CheckpointError(f"tensors the configs do not account for: {', '.join(extra[:10])}")

    hidden, merger_out = llm_cfg["hidden_size"], vlm_cfg["vision_config"]["out_hidden_size"]
    out_dtype = torch_dtype(dtype) if dtype else None
    sources = [(vlm, n) for n in vis_shapes] + [(llm, n) for n in llm_shapes]
    plan = [TensorSpec(n, src.spec(n).shape, out_dtype or src.spec(n).dtype) for src, n in sources]
    new_dtype = out_dtype or vlm.spec("visual.merger.mlp.2.weight").dtype
    plan += [TensorSpec(f"{NEW_LAYER}.weight", (hidden, merger_out), new_dtype),
             TensorSpec(f"{NEW_LAYER}.bias", (hidden,), new_dtype)]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        bar = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="build", disable=not progress)
        for src, name in sources:
            t = src.get(name)
            writer.write(name, t.to(out_dtype) if out_dtype else t)
            bar.update(t.numel() * (out_dtype or t.dtype).itemsize)
            del t
        gen = torch.Generator().manual_seed(seed)
        weight = torch.empty(hidden, merger_out, dtype=torch.float32).normal_(0.0, init_std, generator=gen)
        writer.write(f"{NEW_LAYER}.weight", weight.to(new_dtype))
        writer.write(f"{NEW_LAYER}.bias", torch.zeros(hidden, dtype=new_dtype))
        bar.update(weight.numel() * new_dtype.itemsize + hidden * new_dtype.itemsize)
        bar.close()
        writer.close()
        _write_side_files(tmp, vlm_dir, llm_dir, cfg)
        n = len(plan)
    return BuildResult(Path(out), n, writer.total_size)


def _write_side_files(tmp: Path, vlm_dir: Path, llm_dir: Path, cfg: dict) -> None:
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (llm_dir / name).exists():
            shutil.copy2(llm_dir / name, tmp / name)
    tok_cfg = tmp / "tokenizer_config.json"
    if tok_cfg.exists():  # the template file below is the one source of the chat template
        data = json.loads(tok_cfg.read_text())
        data.pop("chat_template", None)
        tok_cfg.write_text(json.dumps(data, indent=2) + "\n")
    (tmp / "chat_template.jinja").write_text(chat_template("qwen3_vl"))
    for name in PROCESSOR_FILES:
        if (vlm_dir / name).exists():
            shutil.copy2(vlm_dir / name, tmp / name)
    if not (tmp / "preprocessor_config.json").exists():
        raise CheckpointError(f"{vlm_dir}: no preprocessor_config.json (the image processor comes from the VLM)")
    if (llm_dir / "generation_config.json").exists():
        shutil.copy2(llm_dir / "generation_config.json", tmp / "generation_config.json")
    try:
        from ..hf import write_remote_code  # transformers remote code, from the hf integration
    except ImportError:
        return
    write_remote_code(tmp)
