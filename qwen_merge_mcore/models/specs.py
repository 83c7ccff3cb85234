"""Layer specs (Megatron-Core ModuleSpec) for the ViT blocks and the Qwen3 decoder layers.

The architecture is data: one function builds a pre-norm transformer layer spec from a backend
provider. `te` uses Megatron-Core's TESpecProvider (Transformer Engine linears with the input norm
fused into linear_qkv / linear_fc1, TEDotProductAttention, TENorm; FP8-capable). `local` uses
Megatron-Core's LocalSpecProvider (its own parallel linears and torch norms) with the core
attention swapped for `SDPACoreAttention`, because Megatron's DotProductAttention allocates on
CUDA. Checkpoints differ only in where the input norms live (see checkpoint/mapping.py).
"""

from __future__ import annotations

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import SDPACoreAttention, TokenRotarySelfAttention
from .backend import resolve_backend

# Megatron-Core's local GPT layer spec (get_gpt_layer_local_spec) maps the unfused norms onto the
# names Transformer Engine gives them, so that checkpoints do not depend on the backend.
LOCAL_TO_TE_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class SDPALocalSpecProvider(LocalSpecProvider):
    """Megatron-Core's local modules, with a core attention that runs on CPU."""

    def core_attention(self) -> type:
        return SDPACoreAttention


def _provider(backend: str):
    if resolve_backend(backend) == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return SDPALocalSpecProvider()


def transformer_layer_spec(backend: str, *, qk_layernorm: bool, causal: bool) -> ModuleSpec:
    """A pre-RMSNorm attention + gated-MLP layer.

    ViT blocks: `qk_layernorm=False, causal=False` (bidirectional, windows via packed cu_seqlens).
    Qwen3 decoder layers: `qk_layernorm=True, causal=True`.
    """
    provider = _provider(backend)
    fused = provider.fuse_layernorm_and_linear()
    norm = provider.layer_norm(rms_norm=True, for_qk=False)
    qk_norm = provider.layer_norm(rms_norm=True, for_qk=True) if qk_layernorm else IdentityOp
    qkv = provider.column_parallel_layer_norm_linear() if fused else provider.column_parallel_linear()
    fc1 = provider.column_parallel_layer_norm_linear() if fused else provider.column_parallel_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=ModuleSpec(
                module=TokenRotarySelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=qkv,
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=_bias_dropout_add(),
            pre_mlp_layernorm=IdentityOp if fused else norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=fc1, linear_fc2=provider.row_parallel_linear())),
            mlp_bda=_bias_dropout_add(),
            sharded_state_dict_keys_map={} if fused else dict(LOCAL_TO_TE_KEYS),
        ),
    )


def _bias_dropout_add():
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    return get_bias_dropout_add


def parallel_linears(backend: str) -> tuple[type, type]:
    """(column-parallel, row-parallel) linear classes of a backend (the projector's layers)."""
    provider = _provider(backend)
    return provider.column_parallel_linear(), provider.row_parallel_linear()


def norm_module(backend: str) -> type:
    """The RMSNorm class of a backend (final layernorm, projector ln_q)."""
    return _provider(backend).layer_norm(rms_norm=True, for_qk=False)
