"""Parameter and model-state byte counts against models built from the same shapes."""

import pytest
import torch

from qwen_merge_mcore.config import PRESETS, ParallelConfig, config_from_dict
from qwen_merge_mcore.hf_config import qwen2_5_vl_vision_dict, qwen3_config_dict
from qwen_merge_mcore.perf.memory import (TORCH_FP32_ADAMW, parameter_counts, rank_parameters,
                                          state_bytes)
from qwen_merge_mcore.perf.models import plan_model

# A mid-size shape: wider than tiny on every axis, a real-size vocabulary remainder (32003 is
# not a multiple of 128) and a ViT MLP width that, like 3420, is not a multiple of 16.
MID = {"model": {"preset": "tiny",
                 "vision": {"depth": 3, "hidden_size": 256, "num_heads": 4, "intermediate_size": 684,
                            "fullatt_block_indexes": [2]},
                 "projector": {"merger_out_size": 512},
                 "language": {"num_layers": 3, "hidden_size": 384, "num_attention_heads": 6, "num_query_groups": 2,
                              "head_dim": 64, "ffn_hidden_size": 1024, "vocab_size": 32003}},
       "train": {"train_iters": 1}}


def _hf_parts(model, device=None):
    """transformers' Qwen3 LLM, Qwen2.5-VL vision tower (ViT + merger) and the new mlp.4 layer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    with torch.device(device or "cpu"):
        llm = Qwen3ForCausalLM(Qwen3Config(**qwen3_config_dict(model.language, eos_token_id=0)))
        tower = Qwen2_5_VisionTransformerPretrainedModel(
            Qwen2_5_VLVisionConfig(**qwen2_5_vl_vision_dict(model.vision, model.projector.merger_out_size)))
        fc3 = torch.nn.Linear(model.projector.merger_out_size, model.language.hidden_size)
    return llm, tower, fc3


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors once


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_equal_hf_reference_on_meta(preset):
    """Every preset, 32B included, built on the meta device (no memory)."""
    model = plan_model(preset).model
    llm, tower, fc3 = _hf_parts(model, "meta")
    counts = parameter_counts(model, padded=False)
    assert counts.language == _numel(llm)
    assert counts.vision + counts.projector == _numel(tower) + _numel(fc3)
    assert counts.vision == _numel(tower) - _numel(tower.merger)
    # Megatron pads the vocabulary to make_vocab_size_divisible_by x TP rows.
    lang = model.language
    for tp in (1, 2, 4, 8):
        padded = parameter_counts(model, 1, padded=True).total
        extra = (lang.padded_vocab_size(1) - lang.vocab_size) * lang.hidden_size * (1 if lang.tie_word_embeddings else 2)
        assert padded == counts.total + extra
        assert parameter_counts(model, tp).embedding * tp == lang.padded_vocab_size(tp) * lang.hidden_size


def _built_state_bytes(model, freeze_vision=True):
    """Build the HF parts in fp32, run one forward/backward/AdamW step with the ViT (not the
    merger) frozen, and measure weight, gradient and optimizer-state bytes."""
    torch.manual_seed(0)
    llm, tower, fc3 = _hf_parts(model)
    modules = [llm, tower, fc3]
    for name, p in tower.named_parameters():
        p.requires_grad_(not (freeze_vision and not name.startswith("merger.")))
    vis = model.vision
    grid = torch.tensor([[1, 4, 8]])
    patch_dim = vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2
    out = tower(torch.randn(32, patch_dim), grid_thw=grid)
    image = fc3(out.pooler_output if hasattr(out, "pooler_output") else out)
    embeds = torch.cat([image, llm.get_input_embeddings()(torch.tensor([[1, 2, 3, 4]]))[0]])[None]
    llm(inputs_embeds=embeds, labels=torch.randint(0, 10, (1, embeds.shape[1]))).loss.backward()
    trainable = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable)
    opt.step()
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    states = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    return weights, grads, states


@pytest.mark.parametrize("raw", [{"model": {"preset": "tiny"}, "train": {"train_iters": 1}}, MID], ids=["tiny", "mid"])
def test_state_bytes_equal_built_model(raw):
    """fp32 weights, gradients of the trainable parts (merger, mlp.4, LLM) and AdamW's exp_avg and
    exp_avg_sq (its per-tensor `step` counters excluded) match the analytic count exactly."""
    model = config_from_dict(raw, check_runtime=False).model
    counts = parameter_counts(model, padded=False)
    expected = state_bytes(counts.total, counts.total - counts.vision, TORCH_FP32_ADAMW)
    assert _built_state_bytes(model) == (expected.params, expected.grads, expected.optimizer)


def test_megatron_state_bytes_and_shared_embedding():
    model = plan_model("qwen-merge-72bvit-4b").model  # tied embeddings
    counts = parameter_counts(model)
    ranks = rank_parameters(model, ParallelConfig(pipeline_model_parallel_size=4, first_stage_layers=6))
    assert [r.decoder_layers for r in ranks] == [6, 10, 10, 10]
    # PP > 1 with tied embeddings: the last stage holds a synced copy of the embedding.
    assert sum(r.total for r in ranks) == counts.total + counts.embedding
    assert ranks[0].vision == counts.vision and ranks[1].vision == 0
    # Distributed optimizer: 12 bytes/param sharded over DP x CP, fp32 grads, bf16 weights.
    s = state_bytes(1000, 600, data_parallel=8)
    assert (s.params, s.grads, s.optimizer) == (2000, 2400, 900)
    # TP shards: per-rank count x TP exceeds the total only by the replicated tensors.
    tp4 = parameter_counts(model, 4)
    lang = model.language
    replicated = 2 * lang.hidden_size + 2 * lang.head_dim
    assert tp4.decoder_layer * 4 == counts.decoder_layer + 3 * replicated


def test_megatron_model_counts(distributed):
    """The built Megatron QwenMergeModel on CPU: per-part counts on each rank equal the analytic
    per-rank counts at TP=2 (vocabulary 1000 padded to 1024 rows, shards) and at PP=2 with the
    ViT + 1 decoder layer on the first stage."""
    cfg = plan_model("tiny").model
    tp2 = distributed(_megatron_counts, world_size=2, tp=2, args=(2, 1))
    expected = parameter_counts(cfg, 2)
    for rank in tp2:
        assert rank == {"vision": expected.vision, "projector": expected.projector, "language": expected.language}
    pp2 = distributed(_megatron_counts, world_size=2, pp=2, args=(1, 2))
    ranks = rank_parameters(cfg, ParallelConfig(pipeline_model_parallel_size=2, first_stage_layers=1))
    for built, want in zip(pp2, ranks):
        assert built == {"vision": want.vision, "projector": want.projector, "language": want.language}
    assert sum(r["vision"] + r["projector"] + r["language"] for r in pp2) == parameter_counts(cfg).total


def _megatron_counts(tp: int, pp: int) -> dict:
    """Rank side: build the tiny Megatron QwenMergeModel (local backend) for this rank's stage."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.config import config_from_dict
    from qwen_merge_mcore.models.qwen_merge import build_model
    from qwen_merge_mcore.training.model_provider import parameter_report

    cfg = config_from_dict({"model": {"preset": "tiny", "backend": "local"},
                            "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                         "first_stage_layers": 1 if pp > 1 else None},
                            "precision": {"params_dtype": "fp32"}, "train": {"train_iters": 1}}, check_runtime=False)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = build_model(cfg, pre_process=stage == 0, post_process=stage == pp - 1)
    return {part: n["trainable"] + n["frozen"] for part, n in parameter_report([model], this_rank=True).items()}
