# Qwen-Merge (Qwen2.5-VL vision tower + projector with an extra layer + Qwen3 decoder) for
# Hugging Face transformers. Self-contained (imports only torch, safetensors and transformers): it
# is copied next to every exported checkpoint as remote code, and the qwen_merge_mcore package
# registers these very classes with the Auto classes.
"""Qwen-Merge model built from transformers' own Qwen2.5-VL vision tower and Qwen3 decoder layers.

Checkpoint layout (as the original Qwen-Merge ships it): `visual.*` (ViT + merger, with the new
`visual.merger.mlp.4`), `model.*` (a Qwen3 decoder: embed_tokens, layers, norm), `lm_head.weight`.
The module tree has the same names, so no key renaming is needed when loading or saving.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3RMSNorm

from .configuration_qwen2_5_vl_merge import (
    Qwen2_5_VL_MergeConfig,
    Qwen2_5_VL_MergeTextConfig,
    Qwen2_5_VL_MergeVisionConfig,
)


class CheckpointError(ValueError):
    """An exported folder whose files do not form a loadable Qwen-Merge checkpoint."""


class Qwen2_5_VL_MergePatchMerger(Qwen2_5_VLPatchMerger):
    """Qwen2.5-VL's merger (ln_q, mlp.0, GELU, mlp.2) followed by GELU and the new mlp.4 into the LLM width."""

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int, out_dim: int) -> None:
        super().__init__(dim=dim, context_dim=context_dim, spatial_merge_size=spatial_merge_size)
        self.mlp.append(nn.GELU())
        self.mlp.append(nn.Linear(dim, out_dim))


class Qwen2_5_VL_MergeVisionTransformer(Qwen2_5_VisionTransformerPretrainedModel):
    config: Qwen2_5_VL_MergeVisionConfig
    config_class = Qwen2_5_VL_MergeVisionConfig

    def __init__(self, config: Qwen2_5_VL_MergeVisionConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        self.merger = Qwen2_5_VL_MergePatchMerger(config.out_hidden_size, config.hidden_size,
                                                  config.spatial_merge_size, config.out_hidden_size2)
        self.post_init()


class Qwen2_5_VL_MergeModel(Qwen2_5_VLTextModel):
    """The language model: Qwen3 decoder layers (q/k norm, GQA) rotated with Qwen2.5-VL's MRoPE.

    The forward pass is Qwen2.5-VL's text model (3-row position ids, causal masks); only the
    layers differ.
    """

    config: Qwen2_5_VL_MergeTextConfig
    config_class = Qwen2_5_VL_MergeTextConfig
    _no_split_modules = ["Qwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen3DecoderLayer, "attentions": Qwen3Attention}

    def __init__(self, config: Qwen2_5_VL_MergeTextConfig):
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


@dataclass
class Qwen2_5_VL_MergeCausalLMOutputWithPast(CausalLMOutputWithPast):
    rope_deltas: torch.LongTensor | None = None


class Qwen2_5_VL_MergePreTrainedModel(PreTrainedModel):
    config: Qwen2_5_VL_MergeConfig
    config_class = Qwen2_5_VL_MergeConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "Qwen2_5_VLVisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class Qwen2_5_VL_MergeForConditionalGeneration(Qwen2_5_VL_MergePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    accepts_loss_kwargs = False

    def __init__(self, config: Qwen2_5_VL_MergeConfig):
        super().__init__(config)
        self.visual = Qwen2_5_VL_MergeVisionTransformer._from_config(config.vision_config)
        self.model = Qwen2_5_VL_MergeModel._from_config(config.text_config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.rope_deltas = None  # [B, 1]: MRoPE position minus token index, kept for decoding steps
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # Check a local folder before loading, so that a missing shard or a config.json from
        # another model is reported as such, not as a shape mismatch deep inside the loader.
        if os.path.isdir(str(pretrained_model_name_or_path)):
            config = kwargs.get("config")
            if not isinstance(config, Qwen2_5_VL_MergeConfig):
                config = cls.config_class.from_pretrained(pretrained_model_name_or_path)
            validate_checkpoint_folder(pretrained_model_name_or_path, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> torch.Tensor:
        """Projected embeddings [merged tokens, LLM hidden] of all images, in input order."""
        return self.visual(pixel_values.type(self.visual.dtype), grid_thw=image_grid_thw).pooler_output

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor) -> torch.Tensor:
        return self.visual(pixel_values_videos.type(self.visual.dtype), grid_thw=video_grid_thw).pooler_output

    def _scatter(self, input_ids, inputs_embeds, features, token_id: int, kind: str) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(f"{kind} inputs need input_ids to find the <|{kind}_pad|> placeholders")
        mask = input_ids == token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(f"the prompt has {int(mask.sum())} {kind} placeholder tokens (id {token_id}) but the "
                             f"{kind} inputs give {features.shape[0]} merged patches")
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                       attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MRoPE position ids [3, B, L] and deltas [B, 1] (position minus token index after the prompt).

        Qwen2.5-VL's rule: text counts up by one with t = h = w; a vision run takes t = start +
        frame x interval, h/w = start + row/column of the merged grid; text resumes at max + 1.
        Padding (attention_mask 0) gets position 0.
        """
        vision = self.config.vision_config
        grids = {self.config.image_token_id: _rows(image_grid_thw), self.config.video_token_id: _rows(video_grid_thw)}
        seconds = [float(s) for s in second_per_grid_ts] if second_per_grid_ts is not None else None
        used = {tok: 0 for tok in grids}
        position_ids = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
        deltas = []
        for b in range(input_ids.shape[0]):
            keep = (attention_mask[b].bool() if attention_mask is not None
                    else torch.ones_like(input_ids[b], dtype=torch.bool))
            ids = input_ids[b][keep].tolist()
            chunks, start, i = [], 0, 0
            while i < len(ids):
                tok = ids[i]
                if tok not in grids:
                    j = i
                    while j < len(ids) and ids[j] not in grids:
                        j += 1
                    chunks.append(torch.arange(start, start + j - i).expand(3, -1))
                    start, i = start + j - i, j
                    continue
                kind = "image" if tok == self.config.image_token_id else "video"
                if used[tok] >= len(grids[tok]):
                    raise ValueError(f"more {kind} placeholder runs than {kind} grids ({len(grids[tok])})")
                t, h, w = grids[tok][used[tok]]
                h, w = h // vision.spatial_merge_size, w // vision.spatial_merge_size
                interval = 1.0
                if tok == self.config.video_token_id:
                    interval = vision.tokens_per_second * (seconds[used[tok]] if seconds is not None else 1.0)
                tt = (torch.arange(t) * interval).long().view(-1, 1, 1).expand(t, h, w)
                hh = torch.arange(h).view(1, -1, 1).expand(t, h, w)
                ww = torch.arange(w).view(1, 1, -1).expand(t, h, w)
                pos = torch.stack([tt, hh, ww]).reshape(3, -1) + start
                chunks.append(pos)
                start = int(pos.max()) + 1
                used[tok] += 1
                i += t * h * w
            llm_positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
            position_ids[:, b, keep] = llm_positions.to(position_ids.device)
            deltas.append((start - len(ids)))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    def _decoding_position_ids(self, inputs_embeds, attention_mask, past_length: int) -> torch.Tensor:
        batch, length = inputs_embeds.shape[:2]
        if attention_mask is not None:
            text = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            text = torch.arange(past_length, past_length + length).expand(batch, -1)
        text = text.to(inputs_embeds.device)
        deltas = self.rope_deltas.to(text.device).repeat_interleave(batch // self.rope_deltas.shape[0], dim=0)
        return (text + deltas).unsqueeze(0).expand(3, -1, -1)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.IntTensor | None = None,  # from the Qwen2.5-VL processor; the ids suffice here
        **kwargs,
    ) -> Qwen2_5_VL_MergeCausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            inputs_embeds = self._scatter(input_ids, inputs_embeds,
                                          self.get_image_features(pixel_values, image_grid_thw),
                                          self.config.image_token_id, "image")
        if pixel_values_videos is not None:
            inputs_embeds = self._scatter(input_ids, inputs_embeds,
                                          self.get_video_features(pixel_values_videos, video_grid_thw),
                                          self.config.video_token_id, "video")
        if position_ids is None:
            past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
            if input_ids is not None and (past_length == 0 or self.rope_deltas is None):
                position_ids, self.rope_deltas = self.get_rope_index(input_ids, image_grid_thw, video_grid_thw,
                                                                     second_per_grid_ts, attention_mask)
            elif self.rope_deltas is not None:
                position_ids = self._decoding_position_ids(inputs_embeds, attention_mask, past_length)

        outputs = self.model(input_ids=None, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return Qwen2_5_VL_MergeCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                                     hidden_states=outputs.hidden_states,
                                                     attentions=outputs.attentions, rope_deltas=self.rope_deltas)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # generate() computes positions once, then appends +1 per new token on every row:
        # [4, B, L] = text positions (for the causal mask) stacked on the three MRoPE rows.
        text_positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and cache.get_seq_length() != 0 and self.rope_deltas is not None:
            return text_positions[None, ...] + self.rope_deltas
        if "input_ids" in model_kwargs and model_kwargs["input_ids"].shape[1] > 0:
            inputs_tensor = model_kwargs["input_ids"]
        is_ids = inputs_tensor.ndim == 2 and inputs_tensor.dtype in (torch.int, torch.long)
        has_grids = model_kwargs.get("image_grid_thw") is not None or model_kwargs.get("video_grid_thw") is not None
        if is_ids and has_grids:
            vision_positions, self.rope_deltas = self.get_rope_index(
                inputs_tensor, model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw"),
                model_kwargs.get("second_per_grid_ts"), model_kwargs.get("attention_mask"))
        else:
            vision_positions = text_positions.unsqueeze(0).expand(3, -1, -1)
            self.rope_deltas = torch.zeros(inputs_tensor.shape[0], 1, dtype=torch.long, device=inputs_tensor.device)
        return torch.cat([text_positions[None, ...], vision_positions], dim=0)


def _rows(grid) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(x) for x in row) for row in torch.as_tensor(grid).reshape(-1, 3).tolist()]


def expected_checkpoint_shapes(config: Qwen2_5_VL_MergeConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that a checkpoint for `config` must hold (built on the meta device)."""
    with torch.device("meta"):
        model = Qwen2_5_VL_MergeForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def checkpoint_shapes(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape read from the safetensors headers of `folder` (no tensor data is read).

    Raises CheckpointError for a folder without weights or with a shard missing from its index.
    """
    from safetensors import safe_open

    folder = os.fspath(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{folder}: {len(missing)} of {len(shards)} weight shards listed in "
                                  f"model.safetensors.index.json are missing ({', '.join(missing)}): the export is "
                                  "incomplete; copy the missing files or export again")
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        shards, weight_map = ["model.safetensors"], None
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json: not an exported "
                              "Qwen-Merge checkpoint")
    shapes = {}
    for shard in shards:
        with safe_open(os.path.join(folder, shard), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(shapes))
        if absent:
            raise CheckpointError(f"{folder}: model.safetensors.index.json lists {len(absent)} tensors that no shard "
                                  f"holds (first: {absent[0]}): a shard was replaced or truncated")
    return shapes


def validate_checkpoint_folder(folder: str | os.PathLike, config: Qwen2_5_VL_MergeConfig) -> None:
    """Raise CheckpointError naming the problem when `folder`'s weights do not fit `config`."""
    have = checkpoint_shapes(folder)
    want = expected_checkpoint_shapes(config)
    problems = []
    missing = sorted(set(want) - set(have))
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {missing[:3]})")
    unexpected = sorted(set(have) - set(want))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[:3]})")
    wrong = [(k, have[k], want[k]) for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if wrong:
        k, h, w = wrong[0]
        problems.append(f"{len(wrong)} tensors with another shape than config.json implies (first: {k} is "
                        f"{list(h)} in the checkpoint, config.json expects {list(w)})")
    if problems:
        hint = ""
        if "visual.merger.mlp.4.weight" in missing:
            hint = " The projector has no mlp.4: these look like plain Qwen2.5-VL weights."
        elif wrong or missing or unexpected:
            hint = " config.json does not describe these weights (copied from another model or size?)."
        raise CheckpointError(f"{os.fspath(folder)} is not a loadable Qwen-Merge checkpoint: " + "; ".join(problems)
                              + "." + hint)


__all__ = [
    "CheckpointError",
    "Qwen2_5_VL_MergeForConditionalGeneration",
    "Qwen2_5_VL_MergeModel",
    "Qwen2_5_VL_MergePreTrainedModel",
    "Qwen2_5_VL_MergeVisionTransformer",
    "validate_checkpoint_folder",
]
