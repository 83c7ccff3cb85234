"""CPU step time (forward + backward) of the Megatron Qwen-Merge model against transformers.

    python bench/bench_model.py [--steps 5] [--seq 512] [--threads 2]

Both sides get the same shapes (a tiny-but-not-trivial Qwen-Merge: 4-layer Qwen3 of width 512,
4-block ViT of width 256), float32, SDPA attention, one process (TP=1). Measured in this run:
- language: Qwen3LanguageModel (per-token loss, mean, backward) vs Qwen3ForCausalLM(labels=...)
- vision:   QwenVisionModel + projector (sum, backward) vs transformers' Qwen2.5-VL vision tower
            + GELU + a Linear for mlp.4
- full:     QwenMergeModel with images vs the transformers vision tower feeding Qwen3ForCausalLM
Prints median seconds per step and the ratio ours / transformers (< 1 means faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, package not installed


def _config(seq: int):
    from qwen_merge_mcore.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "backend": "local",
                  "vision": {"hidden_size": 256, "num_heads": 4, "intermediate_size": 688, "depth": 4},
                  "projector": {"merger_out_size": 512},
                  "language": {"num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
                               "num_query_groups": 4, "head_dim": 64, "ffn_hidden_size": 1408,
                               "vocab_size": 8192, "max_position_embeddings": max(seq, 4096)}},
        "precision": {"params_dtype": "fp32"},
        "train": {"train_iters": 1, "freeze": []},
    }, check_runtime=False)


def _time_pair(ours, theirs, steps: int) -> tuple[float, float]:
    """Median seconds of each; the two alternate step by step so that a change in machine load
    hits both sides alike."""
    ours(), theirs()  # warm-up (allocations, lazy inits)
    times: tuple[list, list] = ([], [])
    for _ in range(steps):
        for step, bucket in ((ours, times[0]), (theirs, times[1])):
            start = time.perf_counter()
            step()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _inputs(cfg, seq: int):
    from qwen_merge_mcore.batch import VisionInput
    from qwen_merge_mcore.positions import mrope_position_ids

    m = cfg.model
    grid = torch.tensor([[1, 16, 16], [1, 12, 20]])  # 64 + 60 merged tokens
    n_img = int((grid.prod(-1) // 4).sum())
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, m.language.vocab_size, (seq - n_img - 4,), generator=g)
    img = lambda n: [m.vision_start_token_id] + [m.image_token_id] * n + [m.vision_end_token_id]  # noqa: E731
    half = len(text) // 2
    tokens = torch.tensor(text[:half].tolist() + img(64) + text[half:].tolist() + img(60))[None]
    positions = mrope_position_ids(tokens[0], grid, image_token_id=m.image_token_id,
                                   video_token_id=m.video_token_id)[:, None]
    v = m.vision
    pixels = torch.randn(int(grid.prod(-1).sum()), v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                         generator=g)
    labels = torch.randint(0, m.language.vocab_size, tokens.shape, generator=g)
    return tokens, positions, VisionInput(pixels, grid), labels


def _transformers_models(cfg):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qwen_merge_mcore.hf_config import qwen2_5_vl_vision_dict, qwen3_config_dict

    m = cfg.model
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**qwen3_config_dict(m.language, eos_token_id=2),
                                         attn_implementation="sdpa"))
    vision_cfg = Qwen2_5_VLVisionConfig(**qwen2_5_vl_vision_dict(m.vision, m.projector.merger_out_size))
    vision_cfg._attn_implementation = "sdpa"
    visual = Qwen2_5_VisionTransformerPretrainedModel(vision_cfg)
    mlp4 = torch.nn.Linear(m.projector.merger_out_size, m.language.hidden_size)
    return qwen3.float().train(), visual.float().train(), mlp4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sample (images included)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))

    from qwen_merge_mcore import distributed
    from qwen_merge_mcore.models.qwen_merge import build_model

    cfg = _config(args.seq)
    distributed.initialize(cfg.parallel, backend="gloo")
    try:
        torch.manual_seed(0)
        ours = build_model(cfg).train()
        qwen3, visual, mlp4 = _transformers_models(cfg)
        tokens, positions, images, labels = _inputs(cfg, args.seq)
        text_positions = positions[:1].expand(3, -1, -1)  # any positions: same cost
        image_id = cfg.model.image_token_id

        def ours_language():
            ours.language_model(tokens, text_positions, labels=labels).mean().backward()

        def hf_language():
            qwen3(input_ids=tokens, labels=labels).loss.backward()

        def ours_vision():
            ours.encode(images).sum().backward()

        def hf_features():
            merged = visual(images.pixel_values, grid_thw=images.grid_thw).pooler_output
            return mlp4(F.gelu(merged))

        def hf_vision():
            hf_features().sum().backward()

        def ours_full():
            ours(tokens, positions, images=images, labels=labels).mean().backward()

        def hf_full():
            embeds = qwen3.model.embed_tokens(tokens)
            embeds = embeds.masked_scatter((tokens == image_id)[..., None], hf_features())
            qwen3(inputs_embeds=embeds, labels=labels).loss.backward()

        print(f"CPU step time, forward + backward, float32, {torch.get_num_threads()} threads, "
              f"{tokens.shape[1]} tokens, {images.pixel_values.shape[0]} patches, median of {args.steps}")
        print(f"{'case':<10}{'ours (s)':>12}{'transformers (s)':>20}{'ratio ours/hf':>16}")
        for name, mine, theirs in (("language", ours_language, hf_language), ("vision", ours_vision, hf_vision),
                                   ("full", ours_full, hf_full)):
            a, b = _time_pair(mine, theirs, args.steps)
            print(f"{name:<10}{a:>12.4f}{b:>20.4f}{a / b:>16.2f}")
    finally:
        distributed.destroy()


if __name__ == "__main__":
    main()
