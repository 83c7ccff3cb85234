"""Shared pieces of the model tests: configs, TP logit gathering, transformers references."""

from __future__ import annotations

import torch
import torch.distributed as dist


def experiment_config(architecture: str = "qwen_merge", tied: bool = False, tp: int = 1, pp: int = 1,
                      first_stage_layers: int | None = None, freeze: tuple[str, ...] = ()):
    from qwen_merge_mcore.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "architecture": architecture, "backend": "local",
                  "language": {"tie_word_embeddings": tied}},
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "first_stage_layers": first_stage_layers},
        "precision": {"params_dtype": "fp32"},
        "train": {"train_iters": 1, "freeze": list(freeze)},
    }, check_runtime=False)


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
    rotary = Qwen2_5_VLRotaryEmbedding(cfg)
    return rotary(torch.zeros(1, dtype=torch.float32), position_ids)


@torch.no_grad()
def hf_qwen3_mrope_logits(qwen3, lang, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Qwen3ForCausalLM's own layers, fed MRoPE cos/sin (Qwen2.5-VL rule) instead of its 1D RoPE.
    inputs_embeds [B, S, H], position_ids [3, B, S] -> logits [B, S, V]."""
    cos_sin = hf_mrope_cos_sin(lang, position_ids)
    seq = inputs_embeds.shape[1]
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    hidden = inputs_embeds
    for layer in qwen3.model.layers:
        out = layer(hidden, attention_mask=causal, position_embeddings=cos_sin)
        hidden = out[0] if isinstance(out, tuple) else out
    return qwen3.lm_head(qwen3.model.norm(hidden))
