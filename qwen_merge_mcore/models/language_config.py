"""Megatron-Core `TransformerConfig` from this project's typed configs.

`common_config_kwargs` holds what every transformer of the model shares (parallel layout,
dtypes, recompute, CPU-safe switches); `language_transformer_config` adds the Qwen3 decoder.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ConfigError, LanguageConfig, ParallelConfig, PrecisionConfig, TrainConfig
from ..dtypes import torch_dtype
from ..utils.runtime import cuda_available
from .fp8 import fp8_config_kwargs


def common_config_kwargs(parallel: ParallelConfig, precision: PrecisionConfig,
                         train: Optional[TrainConfig] = None) -> dict:
    """TransformerConfig fields every transformer of the model shares."""
    dtype = torch_dtype(precision.params_dtype)
    cpu = not cuda_available()
    kwargs = dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        hidden_dropout=0.0, attention_dropout=0.0,
        # MRoPE angles differ per token; TE's fused rope restarts positions per packed sequence.
        apply_rope_fusion=False,
        # The fused kernels are CUDA extensions.
        use_cpu_initialization=cpu,
        bias_dropout_fusion=not cpu, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=train is not None and train.engine == "gpu" and _wgrad_fusion_available(),
    )
    recompute = train.recompute_granularity if train is not None else None
    if recompute is not None and cpu:
        # Megatron's activation checkpointing saves and restores CUDA RNG states. Recompute only
        # trades memory for time, so the CPU run (tiny models) goes without it.
        warnings.warn("activation recompute (train.recompute_granularity) needs CUDA; running without it on CPU",
                      RuntimeWarning, stacklevel=2)
    elif recompute == "selective":
        kwargs.update(recompute_granularity="selective")
    elif recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method=train.recompute_method or "uniform",
                      recompute_num_layers=train.recompute_num_layers or 1)
    return kwargs


def _wgrad_fusion_available() -> bool:
    """Fused weight-gradient accumulation writes each linear's weight gradient straight into the
    main_grad buffer Megatron-Core DDP gives it (the GPU engine: `train.engine` resolved to gpu),
    saving a gradient tensor and an add per linear. TE's linears do it natively; Megatron's own
    (the output layer, the local spec) need APEX's fused_weight_gradient_mlp_cuda, so it is on
    only where that imports."""
    return cuda_available() and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def language_transformer_config(lang: LanguageConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                                train: Optional[TrainConfig] = None) -> TransformerConfig:
    """The Qwen3 decoder: RMSNorm, SwiGLU, no linear biases (q/k/v optional), GQA, q/k norm."""
    first = parallel.first_stage_layers
    if first is not None and first < 1:
        raise ConfigError("parallel.first_stage_layers", "Megatron-Core needs at least one decoder layer on "
                          "the first pipeline stage")
    config = TransformerConfig(
        num_layers=lang.num_layers,
        hidden_size=lang.hidden_size,
        ffn_hidden_size=lang.ffn_hidden_size,
        num_attention_heads=lang.num_attention_heads,
        num_query_groups=lang.num_query_groups,
        kv_channels=lang.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=lang.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lang.add_qkv_bias,
        qk_layernorm=lang.qk_layernorm,
        num_layers_in_first_pipeline_stage=first,
        **common_config_kwargs(parallel, precision, train),
        **fp8_config_kwargs(precision, num_layers=lang.num_layers,
                            pipeline_size=parallel.pipeline_model_parallel_size,
                            widths={"hidden_size": lang.hidden_size, "ffn_hidden_size": lang.ffn_hidden_size,
                                    "attention": lang.num_attention_heads * lang.head_dim}),
    )
    return with_variable_seq_lengths(config)


def with_variable_seq_lengths(config: TransformerConfig) -> TransformerConfig:
    """Sequence lengths change from batch to batch (packing, images), so the pipeline p2p must
    exchange shapes. Set after construction: 0.16.1's __post_init__ rejects it for the default
    MoE token dispatcher even in a dense model."""
    config.variable_seq_lengths = True
    return config
