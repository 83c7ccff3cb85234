"""The projector: Qwen2.5-VL's `visual.merger` plus the new `mlp.4` into the LLM width.

    ln_q (RMSNorm per patch) -> 2x2 merge [-1, 4*hidden] -> linear_fc1 (mlp.0) -> GELU
    -> linear_fc2 (mlp.2) -> GELU -> linear_fc3 (mlp.4, only when projector.extra_layer)

fc1 is column parallel and fc2 row parallel (one all-reduce, bias added after it), like a
Megatron MLP. fc3 is row parallel on the full fc2 output: each rank takes its slice of the
input and the all-reduce sums the partial products (its weight is split along the input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import scatter_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from ..config import ModelConfig, ParallelConfig, PrecisionConfig
from .specs import norm_module, parallel_linears
from .vision import vision_transformer_config


class QwenMergeProjector(MegatronModule):
    """Lives next to the ViT on the first pipeline stage and shares its TransformerConfig
    (TP layout, dtype, init)."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, backend: str):
        config = vision_transformer_config(model.vision, parallel, precision)
        super().__init__(config=config)
        vision, projector = model.vision, model.projector
        column, row = parallel_linears(backend)
        merged = vision.hidden_size * vision.spatial_merge_size ** 2
        self.merged_size = merged
        self.ln_q = build_module(norm_module(backend), config=config, hidden_size=vision.hidden_size,
                                 eps=vision.rms_norm_eps)
        self.linear_fc1 = build_module(column, merged, merged, config=config,
                                       init_method=config.init_method, gather_output=False, bias=True,
                                       skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj_fc1")
        self.linear_fc2 = _row_parallel(row, merged, projector.merger_out_size, config,
                                        config.output_layer_init_method, "proj_fc2")
        self.linear_fc3 = None
        if projector.extra_layer:
            self.linear_fc3 = _row_parallel(row, projector.merger_out_size, model.language.hidden_size,
                                            config, init_method_normal(projector.init_std), "proj_fc3")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, vision hidden] patches (2x2 merge windows consecutive) -> [N/4, out]."""
        x = self.ln_q(hidden).reshape(-1, self.merged_size)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))  # exact erf GELU, as HF's nn.GELU()
        if self.linear_fc3 is not None:
            # Transformer Engine's row-parallel linear refuses input_is_parallel=False, so the
            # input is split here for both backends; the weight layout is the same either way.
            x = scatter_to_tensor_model_parallel_region(F.gelu(x))
            x, _ = self.linear_fc3(x)
        return x


def _row_parallel(row: type, in_size: int, out_size: int, config: TransformerConfig, init_method, name: str):
    # skip_bias_add=False: the bias is added once, after the all-reduce.
    return build_module(row, in_size, out_size, config=config, init_method=init_method,
                        bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False,
                        tp_comm_buffer_name=name)
