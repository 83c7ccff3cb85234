"""Shared pieces of the model tests: configs, inputs, TP logit gathering, transformers references.

Two Qwen-Merge references: the project's Hugging Face model class (qwen_merge_mcore.hf), and one
assembled from stock transformers parts: the tiny Qwen2.5-VL's vision tower (`visual`, ending in
mlp.2), GELU and the folder's mlp.4, and the tiny Qwen3's layers fed MRoPE cos/sin from
transformers' own Qwen2.5-VL rotary embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

# (t, h, w) patch grids: non-square, one padded to whole windows, one smaller than a window.
GRIDS = [[1, 8, 12], [1, 4, 4], [1, 6, 10]]


def experiment_config(architecture: str = "qwen_merge", tied: bool = False, tp: int = 1, pp: int = 1,
                      first_stage_layers: int | None = None, freeze: tuple[str, ...] = (), vpp: int | None = None):
    from qwen_merge_mcore.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "architecture": architecture, "backend": "local",
                  "language": {"tie_word_embeddings": tied}},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "first_stage_layers": first_stage_layers, "virtual_pipeline_model_parallel_size": vpp},
        "precision": {"params_dtype": "fp32"},
        "train": {"train_iters": 1, "freeze": list(freeze)},
    }, check_runtime=False)


def qwen2_5_vl_experiment_config(folder):
    """A plain Qwen2.5-VL (qkv bias, no q/k norm, no mlp.4) read from its HF config.json."""
    import json

    from qwen_merge_mcore.config import ExperimentConfig, PrecisionConfig, TrainConfig
    from qwen_merge_mcore.hf_config import model_config_from_hf

    model = model_config_from_hf(json.loads((Path(folder) / "config.json").read_text()))
    model.backend = "local"
    cfg = ExperimentConfig(model=model, precision=PrecisionConfig(params_dtype="fp32"),
                           train=TrainConfig(train_iters=1, freeze=[]))
    cfg.validate()
    return cfg


def text_inputs(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(10, vocab, (2, 12), generator=g)
    from qwen_merge_mcore.positions import text_position_ids

    return {"tokens": tokens, "position_ids": text_position_ids(12)[:, None].expand(3, 2, 12).clone(),
            "labels": torch.randint(0, vocab, (2, 12), generator=g)}


def multimodal_inputs() -> dict:
    """Two samples: sample 0 holds images 0 and 1, sample 1 image 2 (then padding)."""
    from qwen_merge_mcore.batch import VisionInput
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config
    from qwen_merge_mcore.positions import mrope_position_ids

    cfg = tiny_model_config()
    g = torch.Generator().manual_seed(2)
    start, end, pad = cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id
    counts = [t * h * w // 4 for t, h, w in GRIDS]

    def text(n):
        return torch.randint(10, cfg.language.vocab_size, (n,), generator=g).tolist()

    def image(i):
        return [start] + [pad] * counts[i] + [end]

    samples = [text(3) + image(0) + text(2) + image(1) + text(3), text(4) + image(2) + text(5)]
    grids = [torch.tensor(GRIDS[:2]), torch.tensor(GRIDS[2:])]
    length = max(len(s) for s in samples)
    samples[1] += [0] * (length - len(samples[1]))
    tokens = torch.tensor(samples)
    positions = torch.stack([mrope_position_ids(t, grid, image_token_id=pad, video_token_id=cfg.video_token_id)
                             for t, grid in zip(tokens, grids)], dim=1)
    v = cfg.vision
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), v.in_channels * v.temporal_patch_size
                         * v.patch_size ** 2, generator=g)
    return {"tokens": tokens, "position_ids": positions, "images": VisionInput(pixels, torch.tensor(GRIDS)),
            "labels": torch.randint(0, cfg.language.vocab_size, tokens.shape, generator=g)}


def exported_qwen_merge(tiny: dict, out: Path) -> Path:
    """The tiny exported Qwen-Merge folder of the HF integration (`visual.*` of the tiny VLM, a new
    `visual.merger.mlp.4`, the tiny Qwen3), read by both the Megatron model and the references."""
    from qwen_merge_mcore.hf import make_tiny_qwen_merge

    return make_tiny_qwen_merge(out / "qwen_merge", tiny)


@torch.no_grad()
def hf_project_model_logits(folder: Path, inputs: dict) -> torch.Tensor:
    """The project's transformers model (`Qwen2_5_VL_MergeForConditionalGeneration`), which
    derives its MRoPE ids from the grids itself. Logits [B, S, V]."""
    from qwen_merge_mcore.hf import Qwen2_5_VL_MergeForConditionalGeneration

    model = Qwen2_5_VL_MergeForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    images = inputs["images"]
    return model(input_ids=inputs["tokens"], pixel_values=images.pixel_values,
                 image_grid_thw=images.grid_thw).logits


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """All TP shards of [..., V/TP] logits side by side (Megatron's gather helpers need CUDA)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def hf_qwen3(folder):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def hf_mrope_cos_sin(lang, position_ids: torch.Tensor):
    """transformers' Qwen2.5-VL rotary embedding for a Qwen3 text config with mrope sections."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    cfg = Qwen2_5_VLTextConfig(hidden_size=lang.hidden_size, num_attention_heads=lang.num_attention_heads,
                               head_dim=lang.head_dim, max_position_embeddings=lang.max_position_embeddings,
                               rope_parameters={"rope_type": "default", "rope_theta": lang.rope_theta,
                                                "mrope_section": list(lang.mrope_section)})
    return Qwen2_5_VLRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), position_ids)


@torch.no_grad()
def hf_qwen_merge_logits(tiny: dict, merged: Path, inputs: dict) -> torch.Tensor:
    """The multimodal reference: transformers' vision tower + GELU + mlp.4, placeholders replaced
    in batch-major order, Qwen3 layers with MRoPE. Logits [B, S, V]."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

    cfg = tiny_model_config()
    visual = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny["qwen2_5_vl"], dtype=torch.float32).model.visual.eval()
    folder = SafetensorsFolder(merged)
    mlp4_w, mlp4_b = (folder.get(f"visual.merger.mlp.4.{p}").float() for p in ("weight", "bias"))
    images = inputs["images"]
    merged_out = visual(images.pixel_values, grid_thw=images.grid_thw).pooler_output
    features = torch.nn.functional.linear(torch.nn.functional.gelu(merged_out), mlp4_w, mlp4_b)

    qwen3 = hf_qwen3(tiny["qwen3"])
    tokens = inputs["tokens"]
    embeds = qwen3.model.embed_tokens(tokens)
    embeds[tokens == cfg.image_token_id] = features
    return hf_qwen3_mrope_logits(qwen3, cfg.language, embeds, inputs["position_ids"])


@torch.no_grad()
def hf_qwen3_mrope_logits(qwen3, lang, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Qwen3ForCausalLM's own layers fed MRoPE cos/sin instead of its 1D RoPE."""
    cos_sin = hf_mrope_cos_sin(lang, position_ids)
    seq = inputs_embeds.shape[1]
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    hidden = inputs_embeds
    for layer in qwen3.model.layers:
        out = layer(hidden, attention_mask=causal, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    return qwen3.lm_head(qwen3.model.norm(hidden))
