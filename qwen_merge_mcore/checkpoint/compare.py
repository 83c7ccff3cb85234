"""`qmm compare`: the same prompts through the HF model (transformers, the numerical reference)
and through the converted Megatron checkpoint, loaded by Megatron's dist_checkpointing at TP=N.

Prompts: a text prompt, and for models with a ViT a prompt with one synthetic image (made by the
checkpoint's own processor). Both sides run in fp32 by default; the report holds, per prompt, the
max abs difference of the logits over the real vocabulary and the top-5 agreement (fraction of
positions whose top-5 token sets are equal).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import torch_dtype
from .common import checkpoint_model_config, converter_experiment, load_model, model_chunks, read_model_config
from .safetensors_io import CheckpointError

TEXT_PROMPT = "The quick brown fox jumps over the lazy dog. Megatron and transformers must agree."
IMAGE_PROMPT = "Describe this picture: <|vision_start|><|image_pad|><|vision_end|> in one sentence."


def _synthetic_image():
    from PIL import Image

    x = torch.linspace(0, 255, 84)
    rgb = torch.stack([x[None, :].expand(84, 84), x[:, None].expand(84, 84), 255 - x[None, :].expand(84, 84)], -1)
    return Image.fromarray(rgb.to(torch.uint8).numpy())


def make_inputs(hf_dir: Path, cfg) -> dict[str, dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    prompts = {"text": {"input_ids": tokenizer(TEXT_PROMPT, return_tensors="pt")["input_ids"]}}
    if cfg.has_vision:
        # The PIL image processor: transformers' AutoProcessor also loads a video processor that
        # needs torchvision, which the CPU environment does not have.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image = Qwen2VLImageProcessorPil.from_pretrained(hf_dir)(images=[_synthetic_image()], return_tensors="pt")
        tokens = int(image["image_grid_thw"].prod()) // cfg.vision.spatial_merge_size**2
        text = IMAGE_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * tokens)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        # transformers' Qwen2.5-VL builds MRoPE positions from these types (1: image token), as
        # its processor returns them.
        types = (ids == cfg.image_token_id).int()
        prompts["image"] = {"input_ids": ids, "mm_token_type_ids": types,
                            "pixel_values": image["pixel_values"], "image_grid_thw": image["image_grid_thw"]}
    return prompts


def reference_model(hf_dir: Path, cfg, dtype: torch.dtype):
    if cfg.architecture == "qwen3":
        from transformers import Qwen3ForCausalLM as cls
    elif cfg.architecture == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    else:
        try:
            from ..hf import Qwen2_5_VL_MergeForConditionalGeneration as cls
        except (ImportError, AttributeError):
            raise CheckpointError("comparing a Qwen-Merge checkpoint needs the transformers model class of "
                                  "qwen_merge_mcore.hf, which is not installed") from None
    return cls.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def reference_logits(hf_dir: Path, cfg, prompts: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = reference_model(hf_dir, cfg, dtype)
    return {name: model(**inputs).logits[0].float() for name, inputs in prompts.items()}


@torch.no_grad()
def megatron_logits(mcore_dir: str, prompts: dict, dtype: str) -> dict[str, torch.Tensor]:
    """On every rank of an initialised TP group (PP=1): load the checkpoint, run the prompts,
    gather the vocabulary-parallel logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from ..batch import VisionInput
    from ..config import ParallelConfig
    from ..positions import mrope_position_ids

    cfg = checkpoint_model_config(mcore_dir)[1]
    cfg.backend = "local" if not torch.cuda.is_available() else "auto"
    tp = ps.get_tensor_model_parallel_world_size()
    (model,) = model_chunks(converter_experiment(cfg, ParallelConfig(tensor_model_parallel_size=tp), dtype))
    load_model([model], mcore_dir)
    model.eval()
    out = {}
    for name, inputs in prompts.items():
        ids = inputs["input_ids"]
        grid = inputs.get("image_grid_thw")
        pos = mrope_position_ids(ids[0], grid, None, None, image_token_id=cfg.image_token_id,
                                 video_token_id=cfg.video_token_id,
                                 spatial_merge_size=cfg.vision.spatial_merge_size,
                                 tokens_per_second=cfg.vision.tokens_per_second)
        images = (VisionInput(inputs["pixel_values"].to(torch_dtype(dtype)), grid) if grid is not None else None)
        logits = model(ids, pos[:, None, :], images=images)[0].float()  # [S, V_padded / TP]
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        out[name] = torch.cat(parts, dim=-1)[:, : cfg.language.vocab_size]
    return out


def summarize(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    report = {}
    for name in ref:
        a, b = ref[name], got[name]
        top_a, top_b = a.topk(5, dim=-1).indices.sort(-1).values, b.topk(5, dim=-1).indices.sort(-1).values
        report[name] = {"tokens": a.shape[0], "max_abs_diff": float((a - b).abs().max()),
                        "top5_agreement": float((top_a == top_b).all(-1).float().mean())}
    return report


def compare(hf_dir: str | Path, mcore_dir: str | Path, tp: int = 1, dtype: str = "fp32") -> dict:
    from ..distributed import run_distributed

    hf_dir, mcore_dir = Path(hf_dir), Path(mcore_dir)
    checkpoint_model_config(mcore_dir)  # refuses a folder that is not a converted checkpoint
    cfg = read_model_config(hf_dir / "config.json")[1]
    prompts = make_inputs(hf_dir, cfg)
    ref = reference_logits(hf_dir, cfg, prompts, torch_dtype(dtype))
    got = run_distributed(megatron_logits, world_size=tp, tp=tp, args=(str(mcore_dir), prompts, dtype))[0]
    return {"hf": str(hf_dir), "mcore": str(mcore_dir), "tp": tp, "dtype": dtype, **summarize(ref, got)}
