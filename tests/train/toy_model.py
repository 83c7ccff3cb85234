"""A small Megatron-Core model with QwenMergeModel's interface, for fast training-machinery tests.

Same submodule names (`vision_model`, `projector`, `language_model`), same builder and freeze
signatures, same forward contract (per-token loss [B, S] with labels, vocab-parallel cross
entropy): a TransformerBlock with the local spec and SDPA attention, tensor parallel on gloo.
Image patches pass through a linear "ViT" and "projector" and replace the image-token
embeddings. No rotary embedding: the loop does not care how positions are used.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from qwen_merge_mcore.models.attention import SDPACoreAttention

PATCH_DIM = 12


def _config(exp_cfg) -> TransformerConfig:
    return TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        tensor_model_parallel_size=exp_cfg.parallel.tensor_model_parallel_size,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, init_method_std=0.02, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )


class _Language(MegatronModule):
    def __init__(self, config: TransformerConfig, vocab: int):
        super().__init__(config)
        spec = get_gpt_layer_local_spec()
        spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=SDPACoreAttention)
        init = config.init_method
        self.embedding = tensor_parallel.VocabParallelEmbedding(vocab, config.hidden_size, init_method=init,
                                                                config=config)
        self.decoder = TransformerBlock(config, spec)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab, config=config, init_method=init, bias=False, gather_output=False)


class ToyMergeModel(MegatronModule):
    def __init__(self, config: TransformerConfig, vocab: int, image_token_id: int):
        super().__init__(config)
        self.image_token_id = image_token_id
        self.vision_model = torch.nn.Linear(PATCH_DIM, 32)
        self.projector = torch.nn.Linear(32, config.hidden_size)
        self.language_model = _Language(config, vocab)

    def set_input_tensor(self, tensor) -> None:  # PP=1 only
        pass

    def forward(self, tokens, position_ids, images=None, videos=None, packed_seq_params=None, labels=None):
        lm = self.language_model
        emb = lm.embedding(tokens)  # [B, S, H]
        if images is not None:
            feats = self.projector(torch.nn.functional.gelu(self.vision_model(images.pixel_values)))
            mask = tokens == self.image_token_id
            emb = emb.masked_scatter(mask.unsqueeze(-1), feats.to(emb.dtype))
        hidden = lm.decoder(emb.transpose(0, 1).contiguous(), attention_mask=None,
                            packed_seq_params=packed_seq_params)
        logits, _ = lm.output_layer(hidden)  # [S, B, V/TP]
        if labels is None:
            return logits.transpose(0, 1)
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
        return loss.transpose(0, 1).contiguous()  # [B, S]


def build_model(exp_cfg, pre_process: bool = True, post_process: bool = True, vp_stage=None) -> ToyMergeModel:
    return ToyMergeModel(_config(exp_cfg), exp_cfg.model.language.vocab_size, exp_cfg.model.image_token_id)


PART_MODULES = {"vision": "vision_model", "projector": "projector", "language": "language_model"}


def freeze(model: ToyMergeModel, parts) -> None:
    for part in parts:
        for p in getattr(model, PART_MODULES[part]).parameters():
            p.requires_grad_(False)
