"""The Qwen2.5-VL vision transformer on Megatron-Core layers.

Input: the image processor's flattened patches `pixel_values` [N, C*T*P*P] for many images
packed back to back (no padding between them) and their `grid_thw` [n, 3] in patches; patches
of each 2x2 merge window are consecutive. Output: [N, hidden] in that same order (the
projector merges each 4 consecutive rows into one LLM token).

Inside, the patches are reordered so that every attention window (window_size pixels square,
counted in merged units) is contiguous; window blocks attend within their window and the
`fullatt_block_indexes` blocks within their image frame, both as block-diagonal attention
given by cumulative sequence lengths. The rotary angles are 2D (h, w) per patch, so they
follow the patches through the reordering. All index bookkeeping here mirrors transformers'
`Qwen2_5_VisionTransformerPretrainedModel` (get_window_index & co) exactly.

`model.vision.parallel: replicated` (frozen ViT only): the Megatron layers are built over a
tensor-parallel group of this rank alone, so every TP rank of the first stage holds the whole
ViT and no GEMM is split; each rank encodes a patch-balanced share of the images and the
features are all-gathered over the real TP group in image order. The checkpoint layout is
unchanged (full-shape shards, the real TP rank in the replica id), so either mode loads the
other's checkpoints at any TP.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import ParallelConfig, PrecisionConfig, VisionConfig
from .backend import resolve_backend
from .fp8 import fp8_config_kwargs, fp8_fallback
from .language_config import common_config_kwargs
from .specs import transformer_layer_spec

# HF pads each image's merged grid to whole windows with this marker before dropping it.
_PAD = -100


def vision_transformer_config(vision: VisionConfig, parallel: ParallelConfig,
                              precision: PrecisionConfig, replicated: bool = False) -> TransformerConfig:
    """The Qwen2.5-VL ViT blocks: RMSNorm, SwiGLU MLP with biases, fused qkv with bias.

    The ViT lives whole on the first pipeline stage (pipeline size 1 here, or TransformerBlock
    would split its layers across stages) and runs without sequence or context parallelism;
    `replicated`: without tensor parallelism either (the projector keeps the real TP).
    FP8 only with `precision.fp8_vision` (and FP8-aligned widths).
    """
    kwargs = common_config_kwargs(parallel, precision)
    kwargs.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
                  context_parallel_size=1, sequence_parallel=False)
    if replicated:
        kwargs.update(tensor_model_parallel_size=1)
    return TransformerConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=vision.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=True,
        add_qkv_bias=True,
        **kwargs,
        **fp8_config_kwargs(precision, num_layers=vision.depth, pipeline_size=1, enabled=precision.fp8_vision,
                            widths={"hidden_size": vision.hidden_size, "ffn_hidden_size": vision.intermediate_size}),
    )


@dataclass(frozen=True)
class VisionLayout:
    """What the ViT derives from `grid_thw`: the window reordering and the attention segments."""

    window_index: torch.Tensor  # [N / merge_unit] merged units in window order
    reverse_index: torch.Tensor  # its inverse (argsort)
    cu_seqlens: torch.Tensor  # int32, one segment per image frame (full-attention blocks)
    cu_window_seqlens: torch.Tensor  # int32, one segment per non-empty window


def vision_position_ids(grid_thw: torch.Tensor, merge: int, device=None) -> torch.Tensor:
    """[N, 2] (h, w) patch coordinates in the processor's order (2x2 merge windows contiguous)."""
    ids = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h, device=device)[:, None].expand(h, w)
        wpos = torch.arange(w, device=device)[None, :].expand(h, w)
        blocks = (h // merge, merge, w // merge, merge)
        hw = torch.stack([p.reshape(blocks).transpose(1, 2).flatten() for p in (hpos, wpos)], dim=-1)
        ids.append(hw.repeat(t, 1))
    return torch.cat(ids)


def window_index(grid_thw: torch.Tensor, merge: int, window_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged-unit order that makes each window contiguous, and the windows' cumulative lengths.

    As transformers does: every frame's merged grid is padded with `window_units - g % window_units`
    rows/columns (a whole empty window when g divides evenly), cut into windows, padding dropped;
    empty windows give repeated boundaries, removed by `unique_consecutive`.
    Returns (index [N / merge**2] long, cu_window_seqlens int32), both on the CPU.
    """
    indices, cu = [], [0]
    offset = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = window_units - gh % window_units, window_units - gw % window_units
        nh, nw = (gh + pad_h) // window_units, (gw + pad_w) // window_units
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=_PAD)
        padded = padded.reshape(t, nh, window_units, nw, window_units).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, window_units * window_units)
        counts = (padded != _PAD).sum(-1).flatten()
        flat = padded.flatten()
        indices.append(flat[flat != _PAD] + offset)
        cu.extend((counts.cumsum(0) * merge * merge + cu[-1]).tolist())
        offset += t * gh * gw
    cu_window = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int32))
    return torch.cat(indices), cu_window


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 cumulative lengths with one segment of h*w patches per frame of every image/video."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def check_vision_input(pixel_values: torch.Tensor, grid_thw: torch.Tensor, vision: VisionConfig) -> None:
    """Clear errors for inputs the ViT cannot take (instead of a reshape failure deep inside)."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    merge = vision.spatial_merge_size
    if bool((grid_thw <= 0).any()) or bool((grid_thw[:, 1:] % merge != 0).any()):
        raise ValueError(f"grid_thw entries must be positive, with h and w multiples of the spatial merge "
                         f"size {merge}; got {grid_thw.tolist()}")
    patches = int(grid_thw.prod(-1).sum())
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    if tuple(pixel_values.shape) != (patches, features):
        raise ValueError(f"pixel_values must be [{patches}, {features}] (patches of grid_thw {grid_thw.tolist()} x "
                         f"C*T*P*P), got {tuple(pixel_values.shape)}")


def vision_layout(grid_thw: torch.Tensor, vision: VisionConfig, device) -> VisionLayout:
    merge = vision.spatial_merge_size
    index, cu_window = window_index(grid_thw.cpu(), merge, vision.window_size // merge // vision.patch_size)
    index = index.to(device)
    return VisionLayout(window_index=index, reverse_index=torch.argsort(index),
                        cu_seqlens=frame_cu_seqlens(grid_thw.cpu()).to(device), cu_window_seqlens=cu_window.to(device))


class VisionRotaryEmbedding(torch.nn.Module):
    """2D rotary angles: head_dim/4 frequencies for h, the same for w, the pair repeated twice.

    Equals transformers' Qwen2.5-VL vision rope (cos/sin of cat(freq_h, freq_w, freq_h, freq_w))
    in Megatron's layout [N, 1, 1, head_dim], which Megatron applies with the same rotate-half rule.
    Computed on the positions' device; no buffers.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.dim = head_dim // 2
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(0, self.dim, 2, dtype=torch.float, device=position_ids.device)
        inv_freq = 1.0 / (self.theta ** (steps / self.dim))
        angles = (position_ids[..., None].float() * inv_freq).flatten(1)  # [N, 2 * dim/2]
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]


class PatchEmbed(torch.nn.Module):
    """Qwen2.5-VL's Conv3d (kernel = stride = patch) as a bias-free linear over flattened patches;
    replicated across TP (its output feeds the column-parallel qkv, whose backward all-reduces)."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig):
        super().__init__()
        self.in_features = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.proj = torch.nn.Linear(self.in_features, vision.hidden_size, bias=False, device=device,
                                    dtype=config.params_dtype)
        config.init_method(self.proj.weight)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values.to(self.proj.weight.dtype))


_SOLO_GROUPS: dict[int, dist.ProcessGroup] = {}


def solo_process_groups() -> ProcessGroupCollection:
    """Megatron's process groups with tensor parallelism over this rank alone (created once per
    process; only this rank takes part, so ranks without a ViT never have to join)."""
    rank = dist.get_rank()
    if rank not in _SOLO_GROUPS:
        _SOLO_GROUPS[rank] = dist.new_group([rank], use_local_synchronization=True)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.tp = groups.tp_cp = _SOLO_GROUPS[rank]
    return groups


def balance_images(patches: list[int], ranks: int) -> list[int]:
    """The rank that encodes each image: largest first onto the least-loaded rank (by patches),
    ties to the lower index; the same answer on every rank."""
    loads, owner = [0] * ranks, [0] * len(patches)
    for i in sorted(range(len(patches)), key=lambda i: (-patches[i], i)):
        owner[i] = min(range(ranks), key=lambda r: (loads[r], r))
        loads[owner[i]] += patches[i]
    return owner


class QwenVisionModel(MegatronModule):
    """Patch embedding, 2D rope, window/full attention blocks; no final norm (the projector has ln_q)."""

    def __init__(self, vision: VisionConfig, parallel: ParallelConfig, precision: PrecisionConfig, backend: str):
        self.replicated = vision.parallel == "replicated"
        config = vision_transformer_config(vision, parallel, precision, replicated=self.replicated)
        super().__init__(config=config)
        self.vision = vision
        self.backend = resolve_backend(backend)
        self.qkv_format = "thd" if self.backend == "te" else "sbhd"
        self.patch_embed = PatchEmbed(config, vision)
        self.rotary = VisionRotaryEmbedding(vision.head_dim, vision.rope_theta)
        groups = solo_process_groups() if self.replicated and dist.is_initialized() else None
        self.decoder = TransformerBlock(
            config, transformer_layer_spec(self.backend, qk_layernorm=False, causal=False),
            post_layer_norm=False, pg_collection=groups)
        self.fullatt = frozenset(vision.fullatt_block_indexes)
        if self.replicated:
            # Copies on every TP rank: counted once (parameter report, grad norms), like a norm.
            for p in self.parameters():
                p.tensor_model_parallel = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N, C*T*P*P] patches of all images + grid_thw [n, 3] -> [N, hidden] in the input order."""
        check_vision_input(pixel_values, grid_thw, self.vision)
        tp = parallel_state.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
        if self.replicated and tp > 1:
            return self._encode_shared(pixel_values, grid_thw, tp)
        return self._encode(pixel_values, grid_thw)

    @torch.no_grad()
    def _encode_shared(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, tp: int) -> torch.Tensor:
        """This TP rank encodes its share of the images; all-gather (padded to the largest share)
        and put every image's rows back in place. Frozen ViT: no autograd through the gather."""
        group = parallel_state.get_tensor_model_parallel_group()
        rank = parallel_state.get_tensor_model_parallel_rank()
        patches = grid_thw.prod(-1).tolist()
        owner = balance_images(patches, tp)
        starts = [0]
        for n in patches:
            starts.append(starts[-1] + n)
        mine = [i for i in range(len(patches)) if owner[i] == rank]
        dtype = self.patch_embed.proj.weight.dtype
        local = (self._encode(torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in mine]), grid_thw[mine])
                 if mine else pixel_values.new_zeros(0, self.vision.hidden_size, dtype=dtype))
        share = [sum(n for n, o in zip(patches, owner) if o == r) for r in range(tp)]
        padded = F.pad(local, (0, 0, 0, max(share) - local.shape[0]))
        gathered = [torch.empty_like(padded) for _ in range(tp)]
        dist.all_gather(gathered, padded, group=group)
        out = padded.new_empty(starts[-1], self.vision.hidden_size)
        taken = [0] * tp
        for i, r in enumerate(owner):
            out[starts[i]:starts[i + 1]] = gathered[r][taken[r]:taken[r] + patches[i]]
            taken[r] += patches[i]
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Megatron's, with the real TP rank in the replicated ViT's replica ids: its full-shape
        shards match the sharded layout's global tensors, and only TP rank 0 writes them."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replicated and dist.is_initialized():
            rank = parallel_state.get_tensor_model_parallel_rank()
            for item in nested_values(state):
                if isinstance(item, ShardedBase):
                    replica = item.replica_id if isinstance(item.replica_id, tuple) else (item.replica_id, 0, 0)
                    item.replica_id = (replica[0], rank, *replica[2:])
        return state

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        device = pixel_values.device
        layout = vision_layout(grid_thw, self.vision, device)
        unit = self.vision.spatial_merge_size ** 2
        n = pixel_values.shape[0]

        def to_windows(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(n // unit, unit, -1)[layout.window_index].reshape(n, -1)

        hidden = to_windows(self.patch_embed(pixel_values))[:, None, :]  # [s, b=1, h]
        rotary = self.rotary(to_windows(vision_position_ids(grid_thw, self.vision.spatial_merge_size, device)))
        full = self._packed(layout.cu_seqlens)
        windowed = self._packed(layout.cu_window_seqlens)
        # TransformerBlock hands one packed_seq_params to all its layers, but window and full
        # blocks need different segments, so the layers are called one by one (Megatron's own
        # layer modules). Block-level full recompute is therefore not applied here; the ViT is
        # frozen in every training stage, and selective recompute inside the layers still works.
        # FP8 contexts as in TransformerBlock.forward (no-ops unless the config enables FP8).
        delayed = self.config.fp8_recipe == Fp8Recipe.delayed
        with fp8_fallback(self.decoder, n), get_fp8_context(self.config) if delayed else nullcontext():
            for layer in self.decoder.layers:
                params = full if layer.layer_number - 1 in self.fullatt else windowed
                with nullcontext() if delayed else get_fp8_context(self.config, layer.layer_number - 1):
                    hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary,
                                      packed_seq_params=params)
        return hidden.reshape(n // unit, unit, -1)[layout.reverse_index].reshape(n, -1)

    def _packed(self, cu_seqlens: torch.Tensor) -> PackedSeqParams:
        """Block-diagonal attention over `cu_seqlens` segments with per-token rotary angles.

        `thd` (te): what Transformer Engine's fused attention needs; the angles hold one row per
        token, so the layers' TokenRotarySelfAttention rotates all windows in one call (Megatron's
        THD rope would loop over the windows with a host sync each). `sbhd` (local): b=1, Megatron
        applies the angles token by token and the SDPA core attention reads the segments from
        cu_seqlens_q. The local SDPA core attention also runs `thd`, which is how the CPU tests
        cover that path.
        """
        if self.qkv_format == "thd":
            longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                   max_seqlen_q=longest, max_seqlen_kv=longest)
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens)
