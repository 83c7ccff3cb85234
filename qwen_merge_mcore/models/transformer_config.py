"""Megatron-Core `TransformerConfig`s for the model parts, built from our typed configs.

`common_transformer_kwargs` holds what every part shares (parallel layout, dtype, CPU-safe
fusion switches); each part adds its shapes. The ViT keeps its own layout: it lives whole on
the first pipeline stage, so its config has pipeline_model_parallel_size 1 (TransformerBlock
would otherwise split its layers across stages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ParallelConfig, PrecisionConfig, VisionConfig

PARAMS_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def common_transformer_kwargs(parallel: ParallelConfig, precision: PrecisionConfig) -> dict:
    """TransformerConfig fields shared by the ViT and the decoder."""
    cpu = not torch.cuda.is_available()
    dtype = PARAMS_DTYPES[precision.params_dtype]
    return dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Megatron's fused kernels and CUDA-side initialisation need a GPU.
        use_cpu_initialization=cpu,
        bias_dropout_fusion=not cpu,
        persist_layer_norm=not cpu,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )


def vision_transformer_config(vision: VisionConfig, parallel: ParallelConfig,
                              precision: PrecisionConfig) -> TransformerConfig:
    """The Qwen2.5-VL ViT blocks: RMSNorm, SwiGLU MLP with biases, fused qkv with bias."""
    return TransformerConfig(
        **common_transformer_kwargs(parallel, precision),
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.intermediate_size,
        layernorm_epsilon=vision.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        bias_activation_fusion=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        # The ViT's rotary angles are per token (2D positions); TE's fused THD rope kernel would
        # restart positions at every window, while Megatron's unfused path maps them per token.
        apply_rope_fusion=False,
    )
