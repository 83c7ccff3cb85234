"""Qwen-Merge in vLLM, assembled from vLLM's own Qwen2.5-VL vision tower, multimodal processor and
MRoPE rule, and its Qwen3 decoder (tensor parallelism follows those layers).

Differences from vLLM's Qwen2.5-VL: the merger ends with GELU and `mlp.4` (out_hidden_size ->
LLM hidden), the language model is Qwen3ForCausalLM built from `text_config`, and a folder whose
files do not fit its config.json is rejected with the project's own message before any weight is
copied.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from . import compat

compat.apply()  # before vLLM's qwen2_vl imports transformers' torchvision-only module

from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.layers.linear import RowParallelLinear  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix  # noqa: E402
from vllm.model_executor.layers.fusion.mm_input_norm import build_mm_input_norm  # noqa: E402
from vllm.model_executor.models.vision import is_vit_use_data_parallel  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402

from ..hf.remote_code.modeling_qwen2_5_vl_merge import validate_checkpoint_folder  # noqa: E402
from ..hf.remote_code.processing_qwen2_5_vl_merge import Qwen2_5_VL_MergeProcessor  # noqa: E402


class Qwen2_5_VL_MergeProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_hf_config(self):
        # The config class may come from this package or from the folder's remote code.
        config = self.ctx.get_hf_config()
        if getattr(config, "model_type", None) != "qwen2_5_vl_merge":
            raise ValueError(f"expected a qwen2_5_vl_merge config, got model_type {config.model_type!r}")
        return config

    def get_hf_processor(self, **kwargs: object) -> Qwen2_5_VL_MergeProcessor:
        # Qwen2.5-VL's processor with the video part optional (it needs torchvision).
        return self.ctx.get_hf_processor(Qwen2_5_VL_MergeProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # transformers' Qwen2-VL video processor needs torchvision; without it, images only.
        if getattr(self.get_hf_processor(), "video_processor", None) is None:
            return {"image": None}
        return super().get_supported_mm_limits()


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLMultiModalProcessor, info=Qwen2_5_VL_MergeProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VL_MergeForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    # Same checkpoint layout as the original Qwen2.5-VL (`visual.*`, `model.*`, `lm_head.*`), so
    # the parent's weight-name mapper applies unchanged.

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        # The parent's __init__ would build a Qwen2 language model; this is its body with the
        # Qwen3 decoder and the extended merger.
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        multimodal_config = vllm_config.model_config.get_multimodal_config()
        self.use_data_parallel = multimodal_config.mm_encoder_tp_mode == "data"
        self.config = config
        self.model_config = vllm_config.model_config
        self.vllm_config = vllm_config
        self.multimodal_config = multimodal_config
        self.video_pruning_rate = multimodal_config.video_pruning_rate
        self.is_multimodal_pruning_enabled = multimodal_config.is_multimodal_pruning_enabled()

        with self._mark_tower_model(vllm_config, {"image", "video"}):
            self.visual = Qwen2_5_VisionTransformer(
                vision_config=config.vision_config,
                norm_eps=getattr(config, "rms_norm_eps", 1e-6),
                quant_config=self.quant_config,
                input_norm=build_mm_input_norm(self.model_config),
                prefix=maybe_prefix(prefix, "visual"),
            )
            vision = config.vision_config
            # mlp.2's output is complete (row parallel, reduced), so mlp.4 splits its input itself.
            self.visual.merger.mlp.append(nn.GELU())
            self.visual.merger.mlp.append(RowParallelLinear(
                vision.out_hidden_size, vision.out_hidden_size2, bias=True, input_is_parallel=False,
                quant_config=self.quant_config, prefix=maybe_prefix(prefix, "visual.merger.mlp.4"),
                return_bias=False, disable_tp=is_vit_use_data_parallel()))

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"), architectures=["Qwen3ForCausalLM"])

        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        folder = self.model_config.model
        if os.path.isdir(folder):
            validate_checkpoint_folder(folder, self.config)
        return super().load_weights(weights)
