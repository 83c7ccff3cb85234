"""The Qwen3 language model on Megatron-Core: embedding, TransformerBlock, output layer, loss.

Built from Megatron-Core parts and following `GPTModel`'s layout and parameter names
(`embedding.word_embeddings`, `decoder.layers.*`, `decoder.final_layernorm`, `output_layer`),
with two differences: positions are MRoPE angles computed by this project (rope.py) from
[3, B, S] position ids, and packed batches run as THD with per-token angles.

Vocabulary padding: the embedding and output layer have `padded_vocab_size(TP)` rows; the pad
rows' logits are set to -inf, so they get exactly zero probability in the loss, in argmax and in
sampling, and zero gradient.

Tied embeddings follow Megatron: the first stage owns `embedding.word_embeddings.weight`, a
pipeline's last stage holds a copy as `output_layer.weight` initialised from it by an all-reduce
over the embedding group (the training engine all-reduces their gradients).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import LanguageConfig
from .fp8 import fp8_fallback
from .rope import MultimodalRotaryEmbedding
from .specs import norm_module, transformer_layer_spec


def decoder_block_spec(config: TransformerConfig, backend: str, qk_layernorm: bool,
                       vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """This stage's decoder layers (shared layer spec) and the final RMSNorm of the backend."""
    layer = transformer_layer_spec(backend, qk_layernorm=qk_layernorm, causal=True)
    count = get_num_layers_to_build(config, vp_stage=vp_stage,
                                    pp_rank=parallel_state.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[layer] * count,
                                      layer_norm=ModuleSpec(module=norm_module(backend)))


def packed_seq_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """THD parameters of a packed batch. Megatron applies per-token rotary angles in THD when the
    angle tensor covers every token (rope_utils CASE 1), so MRoPE positions survive packing."""
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class Qwen3LanguageModel(LanguageModule):
    def __init__(self, config: TransformerConfig, lang: LanguageConfig, backend: str, *,
                 pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
        super().__init__(config=config)
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = lang.tie_word_embeddings
        self.vocab_size = lang.vocab_size
        self.padded_vocab_size = lang.padded_vocab_size(config.tensor_model_parallel_size)

        if pre_process:
            # Image embeddings are inserted before any sequence-parallel scatter (see forward).
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=self.padded_vocab_size,
                max_sequence_length=lang.max_position_embeddings, position_embedding_type="none",
                scatter_to_sequence_parallel=False)
        self.rotary_pos_emb = MultimodalRotaryEmbedding(lang.head_dim, lang.rope_theta, lang.mrope_section)
        self.decoder = TransformerBlock(
            config=config, spec=decoder_block_spec(config, backend, lang.qk_layernorm, vp_stage),
            pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.padded_vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def setup_embeddings_and_output_layer(self) -> None:
        if torch.cuda.is_available():
            super().setup_embeddings_and_output_layer()
            return
        # Megatron moves the tied weight to CUDA for the first/last-stage all-reduce that copies
        # the embedding into the last stage; run the same all-reduce on CPU instead.
        group, self.embd_group = self.embd_group, None
        try:
            super().setup_embeddings_and_output_layer()
        finally:
            self.embd_group = group
        if (self.share_embeddings_and_output_weights and self.config.pipeline_model_parallel_size > 1
                and dist.is_initialized() and self._is_in_embd_group()):
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=group)

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive hidden states instead of token ids."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "a language model stage takes one input tensor"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [S, B, H] (first stage only)."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def forward(self, input_ids: Optional[torch.Tensor], position_ids: torch.Tensor,
                decoder_input: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token loss [B, S] with labels, logits [B, S, V_padded/TP] without (last stage);
        hidden states [S, B, H] on other stages.

        `decoder_input` [S, B, H] replaces the token embeddings (the composed model inserts image
        embeddings into them); on stages after the first, the input comes from set_input_tensor.
        """
        batch, seq = position_ids.shape[1:]
        if self.pre_process:
            if decoder_input is None:
                decoder_input = self.embed(input_ids)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        else:
            decoder_input = None  # TransformerBlock takes the pipeline input tensor
        params = None
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"a packed batch (cu_seqlens given) must have batch size 1, got {batch}")
            if int(cu_seqlens[-1]) != seq:
                raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the sequence has {seq} tokens")
            params = packed_seq_params(cu_seqlens)
        rotary = self.rotary_pos_emb(position_ids)
        tokens = batch * seq // (self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1)
        with fp8_fallback(self.decoder, tokens):
            hidden = self.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary,
                                  packed_seq_params=params)
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)  # [S, B, V_padded / TP]
        logits = self.mask_vocab_padding(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)

    def mask_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the pad columns of this rank's vocabulary shard."""
        shard = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * shard
        pad_from = self.vocab_size - start
        if pad_from >= shard:
            return logits
        column = torch.arange(start, start + shard, device=logits.device)
        return logits.masked_fill(column >= self.vocab_size, float("-inf"))
