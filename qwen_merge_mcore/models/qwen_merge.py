"""`QwenMergeModel`: Qwen2.5-VL ViT + projector + Qwen3 decoder, one Megatron pipeline chunk.

The ViT and projector live on the first pipeline stage only (`pre_process`), where their
outputs replace the embeddings of the `<|image_pad|>` / `<|video_pad|>` tokens; later stages
receive hidden states through `set_input_tensor`; the last stage (`post_process`) returns the
per-token loss or the logits.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from megatron.core.transformer.module import MegatronModule

from ..batch import VisionInput
from ..config import ExperimentConfig, ModelConfig
from ..config.schema import PARTS
from .backend import resolve_backend
from .language import Qwen3LanguageModel
from .language_config import language_transformer_config

_PART_MODULES = {"vision": "vision_model", "projector": "projector", "language": "language_model"}
assert tuple(_PART_MODULES) == PARTS


class QwenMergeModel(MegatronModule):
    def __init__(self, model_cfg: ModelConfig, language_model: Qwen3LanguageModel,
                 vision_model: Optional[torch.nn.Module] = None, projector: Optional[torch.nn.Module] = None):
        super().__init__(config=language_model.config)
        if (vision_model is None) != (projector is None):
            raise ValueError("the ViT and the projector come together (first pipeline stage)")
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.model_type = language_model.model_type
        self.image_token_id = model_cfg.image_token_id
        self.video_token_id = model_cfg.video_token_id
        self.vision_model = vision_model
        self.projector = projector
        self.language_model = language_model
        # Read by Megatron's finalize_model_grads to all-reduce tied embedding gradients.
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.vision_cache = None  # data.vision_cache: filled with the ViT output of cache misses

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor, images: Optional[VisionInput] = None,
                videos: Optional[VisionInput] = None, cu_seqlens: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens [B, S], position_ids [3, B, S] (MRoPE), labels [B, S] (already shifted).

        Returns the per-token loss [B, S] with labels, else logits [B, S, padded_vocab / TP];
        hidden states [S, B, H] on pipeline stages before the last.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embed(tokens)
            for name, media, token_id in (("image", images, self.image_token_id),
                                          ("video", videos, self.video_token_id)):
                decoder_input = self._insert(decoder_input, tokens, media, token_id, name)
            if images is None and videos is None:
                decoder_input = self._join_unused_encoder(decoder_input)
        return self.language_model(tokens, position_ids, decoder_input=decoder_input, labels=labels,
                                   cu_seqlens=cu_seqlens)

    def _insert(self, embeddings: torch.Tensor, tokens: torch.Tensor, media: Optional[VisionInput],
                token_id: int, name: str) -> torch.Tensor:
        """Replace the placeholder embeddings [S, B, H] with the projected vision features, in
        batch-major order (sample 0's images first), as the data pipeline lays them out."""
        slots = tokens == token_id  # [B, S]
        count = int(slots.sum())
        if media is None:
            if count:
                raise ValueError(f"the tokens hold {count} {name} placeholder tokens but no {name}s were given")
            return embeddings
        if self.vision_model is None:
            raise ValueError(f"{name}s given to a model without a vision tower (architecture or pipeline stage)")
        features = self.encode(media)
        if features.shape[0] != count:
            raise ValueError(f"the {name}s give {features.shape[0]} embeddings (grids {media.grid_thw.tolist()}) "
                             f"but the tokens hold {count} {name} placeholder tokens")
        batch_major = embeddings.transpose(0, 1)  # [B, S, H]
        batch_major = batch_major.masked_scatter(slots.unsqueeze(-1), features.to(embeddings.dtype))
        return batch_major.transpose(0, 1).contiguous()

    def _join_unused_encoder(self, embeddings: torch.Tensor) -> torch.Tensor:
        """A text-only micro-batch leaves the trainable projector (and a trainable ViT) out of the
        forward, but Megatron-Core DDP needs every trainable parameter's gradient in the last
        micro-batch of a step (overlap_grad_reduce: param_and_grad_buffer's "Communication call
        has not been issued") and, with overlap_param_gather, every module's forward pre-hook to
        finish its bucket's all-gather. So the encoder runs on one all-zero merge window and its
        output joins with weight zero: same result, zero gradients."""
        if self.vision_model is None or not torch.is_grad_enabled():
            return embeddings
        vision = self.vision_model.vision
        unit = vision.spatial_merge_size ** 2
        if _trains(self.vision_model):
            grid = torch.tensor([[1, vision.spatial_merge_size, vision.spatial_merge_size]], device=embeddings.device)
            pixels = embeddings.new_zeros(unit, self.vision_model.patch_embed.in_features)
            features = self.encode(VisionInput(pixels, grid))
        elif _trains(self.projector):
            features = self.projector(embeddings.new_zeros(unit, vision.hidden_size))
        else:
            return embeddings
        return embeddings + 0.0 * features.sum().to(embeddings.dtype)

    def encode(self, media: VisionInput) -> torch.Tensor:
        """ViT + projector: [n_merged_tokens, LLM hidden]. A frozen ViT runs without autograd."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(self.vision_model)):
            patches = self._vision_features(media)
        return self.projector(patches)

    def _vision_features(self, media: VisionInput) -> torch.Tensor:
        """The ViT output of every image: cached images from `media.features`, the others encoded
        (and put into the feature cache, before the projector's TP collectives: see vision_cache.py)."""
        if media.keys is None:
            return self.vision_model(media.pixel_values, media.grid_thw)
        cached = media.cached if media.cached is not None else torch.zeros(len(media.keys), dtype=torch.bool)
        sizes = media.grid_thw.prod(-1).tolist()
        hits = iter(media.features.split([n for n, c in zip(sizes, cached.tolist()) if c])
                    if media.features is not None else ())
        misses = iter(())
        if not bool(cached.all()):
            grids = media.grid_thw[~cached.to(media.grid_thw.device)]
            misses = iter(self.vision_model(media.pixel_values, grids).split(grids.prod(-1).tolist()))
        parts = [next(hits) if c else next(misses) for c in cached.tolist()]
        if self.vision_cache is not None:
            for key, c, features in zip(media.keys, cached.tolist(), parts):
                if not c:
                    self.vision_cache.put(key, features)
        return torch.cat(parts)


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def build_model(exp_cfg: ExperimentConfig, pre_process: bool = True, post_process: bool = True,
                vp_stage: Optional[int] = None) -> QwenMergeModel:
    """One pipeline chunk of the model (Megatron's model-provider signature). Freezes the parts
    listed in `train.freeze`."""
    model_cfg = exp_cfg.model
    backend = resolve_backend(model_cfg.backend)
    config = language_transformer_config(model_cfg.language, exp_cfg.parallel, exp_cfg.precision, exp_cfg.train)
    language = Qwen3LanguageModel(config, model_cfg.language, backend, pre_process=pre_process,
                                  post_process=post_process, vp_stage=vp_stage)
    vision = projector = None
    if pre_process and model_cfg.has_vision:
        from .projector import QwenMergeProjector
        from .vision import QwenVisionModel

        vision = QwenVisionModel(model_cfg.vision, exp_cfg.parallel, exp_cfg.precision, backend)
        projector = QwenMergeProjector(model_cfg, exp_cfg.parallel, exp_cfg.precision, backend)
    model = QwenMergeModel(model_cfg, language, vision, projector)
    freeze(model, exp_cfg.train.freeze)
    return model


def part_modules(model: torch.nn.Module) -> dict[str, Optional[torch.nn.Module]]:
    """part -> its module in this chunk (None where this pipeline stage lacks it), in PARTS order."""
    model = _unwrap(model)
    return {part: getattr(model, attr, None) for part, attr in _PART_MODULES.items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Through Megatron's DDP / Float16Module wrappers (`.module`) to the QwenMergeModel."""
    while not isinstance(model, QwenMergeModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, QwenMergeModel):
        raise TypeError(f"expected a QwenMergeModel (possibly wrapped), got {type(model).__name__}")
    return model


def freeze(model: torch.nn.Module, parts: Iterable[str]) -> None:
    """Set requires_grad=False on every parameter of the named parts (absent parts on this
    pipeline stage are skipped); the others train."""
    parts = list(parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts to freeze {unknown}; expected some of {list(PARTS)}")
    for part, module in part_modules(model).items():
        if module is not None:
            for p in module.parameters():
                p.requires_grad_(part not in parts)
