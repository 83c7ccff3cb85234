"""The Megatron Qwen-Merge model against transformers, across TP and PP (CPU, gloo, float32).

Two spawned runs serve every test here: TP=1 (world 1), and TP=2, then PP=2 with an uneven first
stage, then PP=2 with virtual stages (world 2). Ranks return Megatron outputs; transformers references are computed in
the test process.

Tolerance 1e-4 on logits: both sides run float32 from the same bf16 weights; what differs is
float32 summation order (fused vs split q/k/v and gate/up GEMMs, TP partial sums, SDPA vs eager
attention), about 1e-6 on logits of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from qwen_merge_mcore.fixtures.tiny import tiny_model_config
from tests.model.references import (experiment_config, exported_qwen_merge, gather_vocab, hf_project_model_logits,
                                    hf_qwen3, hf_qwen3_mrope_logits, hf_qwen_merge_logits, multimodal_inputs,
                                    qwen2_5_vl_experiment_config, text_inputs)

TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Rank-side cases
# --------------------------------------------------------------------------------------------

def _load(cfg, folder, **stage):
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.models.qwen_merge import build_model

    model = build_model(cfg, **stage)
    load_hf_weights(model, folder, cfg.model)
    return model.eval()


@torch.no_grad()
def _text_case(tiny: dict, tp: int) -> dict:
    out = {}
    for tied in (False, True):
        cfg = experiment_config("qwen3", tied=tied, tp=tp)
        model = _load(cfg, tiny["qwen3-tied" if tied else "qwen3"])
        x = text_inputs(cfg.model.language.vocab_size)
        name = "tied" if tied else "untied"
        out[f"{name}_logits"] = gather_vocab(model(x["tokens"], x["position_ids"]))
        out[f"{name}_loss"] = model(x["tokens"], x["position_ids"], labels=x["labels"])
    return out


@torch.no_grad()
def _multimodal_case(merged, tp: int) -> dict:
    cfg = experiment_config("qwen_merge", tp=tp)
    model = _load(cfg, merged)
    x = multimodal_inputs()
    logits = gather_vocab(model(x["tokens"], x["position_ids"], images=x["images"]))
    # The same two samples packed into one row (THD, positions restarting per sample).
    keep = [(x["tokens"][b] != 0).nonzero().max().item() + 1 for b in range(2)]
    tokens = torch.cat([x["tokens"][b, :n] for b, n in enumerate(keep)])[None]
    positions = torch.cat([x["position_ids"][:, b, :n] for b, n in enumerate(keep)], dim=1)[:, None]
    cu = torch.tensor([0, keep[0], sum(keep)], dtype=torch.int32)
    packed = gather_vocab(model(tokens, positions, images=x["images"], cu_seqlens=cu))
    unpacked = torch.cat([logits[b, :n] for b, n in enumerate(keep)])[None]
    vocab = cfg.model.language.vocab_size  # the pad columns are -inf on both sides
    return {"mm_logits": logits, "mm_packed_diff": (packed - unpacked)[..., :vocab].abs().max().item()}


@torch.no_grad()
def _qwen2_5_vl_case(tiny: dict) -> torch.Tensor:
    """The same composition loading a plain Qwen2.5-VL checkpoint (architecture qwen2_5_vl)."""
    cfg = qwen2_5_vl_experiment_config(tiny["qwen2_5_vl"])
    model = _load(cfg, tiny["qwen2_5_vl"])
    x = multimodal_inputs()
    return model(x["tokens"], x["position_ids"], images=x["images"])


def _freeze_case(merged, parts: tuple[str, ...]) -> dict:
    """One AdamW step on the multimodal loss with `parts` frozen."""
    from qwen_merge_mcore.training.model_provider import parameter_report

    cfg = experiment_config("qwen_merge", freeze=parts)
    model = _load(cfg, merged).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = multimodal_inputs()
    loss = model(x["tokens"], x["position_ids"], images=x["images"], labels=x["labels"]).mean()
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0).step()
    changed = {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    return {"changed": changed, "has_grad": grads, "counts": parameter_report([model], this_rank=True)}


@torch.no_grad()
def _placeholder_errors() -> list[str]:
    """Messages for a placeholder count that does not match the images, and for missing images."""
    from qwen_merge_mcore.models.qwen_merge import build_model

    cfg = experiment_config("qwen_merge")
    model = build_model(cfg).eval()
    x = multimodal_inputs()
    short = x["tokens"].clone()
    short[0, (short[0] == cfg.model.image_token_id).nonzero()[0]] = 20  # one placeholder too few
    messages = []
    for tokens, images in ((short, x["images"]), (x["tokens"], None)):
        try:
            model(tokens, x["position_ids"], images=images)
            messages.append("no error")
        except ValueError as err:
            messages.append(str(err))
    return messages


def _tp_suite(tiny: dict, merged, tp: int) -> dict:
    out = {**_text_case(tiny, tp), **_multimodal_case(merged, tp)}
    if tp == 1:
        out["errors"] = _placeholder_errors()
        out["qwen2_5_vl_logits"] = _qwen2_5_vl_case(tiny)
        out["grads"] = _grads_case(merged)
        out["freeze"] = {parts: _freeze_case(merged, parts) for parts in (("vision",), ("vision", "language"))}
    return out


GRAD_PARAMS = ("vision_model.decoder.layers.0.mlp.linear_fc2.weight", "projector.linear_fc3.weight",
               "language_model.embedding.word_embeddings.weight",
               "language_model.decoder.layers.0.mlp.linear_fc1.weight",
               "language_model.decoder.layers.3.self_attention.linear_qkv.weight",
               "language_model.output_layer.weight")


def _grads(model) -> dict:
    """Gradients of GRAD_PARAMS present on this stage, by global (PP=1) name."""
    names = _global_names(model)
    return {names[n]: p.grad.clone() for n, p in model.named_parameters() if names[n] in GRAD_PARAMS}


def _global_names(model) -> dict[str, str]:
    """Parameter name -> the name with the global layer index (a stage numbers its layers from 0)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from qwen_merge_mcore.checkpoint.mapping import split_layer

    numbers = {name: m.layer_number - 1 for name, m in model.named_modules() if isinstance(m, TransformerLayer)}
    out = {}
    for name, _ in model.named_parameters():
        layer = split_layer(name)
        out[name] = name if layer is None else layer.at(numbers[layer.layer])
    return out


def _grads_case(merged) -> dict:
    """PP=1 gradients of the mean multimodal loss, the reference for the pipeline split."""
    model = _load(experiment_config("qwen_merge"), merged)
    x = multimodal_inputs()
    model(x["tokens"], x["position_ids"], images=x["images"], labels=x["labels"]).mean().backward()
    return _grads(model)


def _pipeline_suite(tiny: dict, merged) -> dict:
    """PP=2, first stage = ViT + projector + 1 decoder layer, last stage = 3 layers + output.
    Hidden states and their gradients go between the ranks with gloo send/recv (Megatron's p2p
    needs CUDA)."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.models.qwen_merge import build_model

    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == 1
    cfg = experiment_config("qwen_merge", pp=2, first_stage_layers=1)
    model = _load(cfg, merged, pre_process=first, post_process=last)
    out = {"layers": [layer.layer_number for layer in model.language_model.decoder.layers],
           "has_vision": model.vision_model is not None}
    x = multimodal_inputs()
    shape = (x["tokens"].shape[1], x["tokens"].shape[0], cfg.model.language.hidden_size)
    # Forward only: logits. Then a training pass: loss on the last stage, its input gradient
    # back to the first stage.
    for labels in (None, x["labels"]):
        with torch.set_grad_enabled(labels is not None):
            if first:
                hidden = model(x["tokens"], x["position_ids"], images=x["images"])
                dist.send(hidden.detach().contiguous(), dst=1)
                if labels is not None:
                    grad = torch.empty(shape)
                    dist.recv(grad, src=1)
                    hidden.backward(grad)
            else:
                hidden = torch.empty(shape)
                dist.recv(hidden, src=0)
                hidden.requires_grad_(labels is not None)
                model.set_input_tensor(hidden)
                result = model(x["tokens"], x["position_ids"], labels=labels)
                if labels is None:
                    out["logits"] = result
                else:
                    result.mean().backward()
                    dist.send(hidden.grad.contiguous(), dst=0)
    out["grads"] = _grads(model)

    # Tied embeddings at PP=2: the last stage's output layer starts as a copy of the first
    # stage's embedding (Megatron's embedding-group all-reduce, here on CPU).
    torch.manual_seed(stage)  # different random init per stage: only the all-reduce can align them
    tied = build_model(experiment_config("qwen3", tied=True, pp=2, first_stage_layers=1),
                       pre_process=first, post_process=last).language_model
    weight = tied.shared_embedding_or_output_weight().detach().clone()
    if first:
        dist.send(weight, dst=1)
    else:
        embedding = torch.empty_like(weight)
        dist.recv(embedding, src=0)
        out["tied_copy_equal"] = torch.equal(embedding, weight)
        out["tied_nonzero"] = bool(weight.abs().sum() > 0)
    return out


def _world2_suite(tiny: dict, merged) -> dict:
    """TP=2, then (same processes, parallel state rebuilt) PP=2: one spawn instead of two."""
    from megatron.core import parallel_state

    out = {"tp2": _tp_suite(tiny, merged, 2)}
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    out["pp2"] = _pipeline_suite(tiny, merged)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    out["vpp"] = _virtual_pipeline_layout()
    return out


def _virtual_pipeline_layout() -> list[dict]:
    """PP=2 x 2 virtual chunks: which global layers and parts each chunk of this rank builds."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.models.qwen_merge import build_model

    rank = parallel_state.get_pipeline_model_parallel_rank()
    cfg = experiment_config("qwen_merge", pp=2, vpp=2)
    chunks = []
    for vp in range(2):
        model = build_model(cfg, pre_process=rank == 0 and vp == 0, post_process=rank == 1 and vp == 1,
                            vp_stage=vp)
        chunks.append({"layers": [layer.layer_number for layer in model.language_model.decoder.layers],
                       "vision": model.vision_model is not None,
                       "output": hasattr(model.language_model, "output_layer")})
    return chunks


# --------------------------------------------------------------------------------------------
# Fixtures: references in this process, Megatron runs in spawned ones
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    return exported_qwen_merge(tiny, tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="module")
def runs(tiny, merged, distributed):
    world2 = distributed(_world2_suite, world_size=2, tp=2, args=(tiny, merged))
    return {"tp1": distributed(_tp_suite, world_size=1, tp=1, args=(tiny, merged, 1))[0],
            "tp2": world2[0]["tp2"], "pp2": [rank["pp2"] for rank in world2],
            "vpp": [rank["vpp"] for rank in world2]}


@pytest.fixture(scope="module")
def text_reference(tiny):
    x = text_inputs(tiny_model_config().language.vocab_size)
    with torch.no_grad():
        return {name: hf_qwen3(tiny[folder])(x["tokens"]).logits
                for name, folder in (("untied", "qwen3"), ("tied", "qwen3-tied"))}


@pytest.fixture(scope="module")
def multimodal_reference(merged):
    return hf_project_model_logits(merged, multimodal_inputs())


@pytest.fixture(scope="module")
def assembled_reference(tiny, merged):
    return hf_qwen_merge_logits(tiny, merged, multimodal_inputs())


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_text_logits_equal_transformers_qwen3(runs, text_reference, tp, tied):
    vocab = tiny_model_config().language.vocab_size
    logits = runs[f"tp{tp}"][f"{tied}_logits"]
    ref = text_reference[tied]
    assert logits.shape[-1] > vocab, "the tiny vocabulary (1000) must be padded for this test to mean anything"
    assert (logits[..., :vocab] - ref).abs().max() < TOL
    # Padded vocabulary rows are never predicted ...
    assert torch.isneginf(logits[..., vocab:]).all()
    # ... so Megatron's vocab-parallel CE over the padded vocabulary is CE over the real one.
    labels = text_inputs(vocab)["labels"]
    ref_loss = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    assert (runs[f"tp{tp}"][f"{tied}_loss"] - ref_loss).abs().max() < TOL


def test_reference_assembly_is_qwen3_for_text(tiny, text_reference):
    """The MRoPE-fed transformers layers used as the multimodal reference are Qwen3 on text."""
    lang = tiny_model_config().language
    x = text_inputs(lang.vocab_size)
    qwen3 = hf_qwen3(tiny["qwen3"])
    with torch.no_grad():
        logits = hf_qwen3_mrope_logits(qwen3, lang, qwen3.model.embed_tokens(x["tokens"]), x["position_ids"])
    assert (logits - text_reference["untied"]).abs().max() < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_multimodal_logits_equal_project_hf_model(runs, multimodal_reference, tp):
    """Full forward with 3 images in 2 samples = Qwen2_5_VL_MergeForConditionalGeneration."""
    logits = runs[f"tp{tp}"]["mm_logits"]
    vocab = multimodal_reference.shape[-1]
    assert (logits[..., :vocab] - multimodal_reference).abs().max() < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_multimodal_logits_equal_stock_transformers_assembly(runs, assembled_reference, tp):
    """... and = stock transformers parts: Qwen2.5-VL vision tower + GELU + mlp.4 + Qwen3 with MRoPE."""
    logits = runs[f"tp{tp}"]["mm_logits"]
    vocab = assembled_reference.shape[-1]
    assert (logits[..., :vocab] - assembled_reference).abs().max() < TOL


def test_plain_qwen2_5_vl_equals_transformers(tiny, runs):
    """Architecture qwen2_5_vl (qkv bias, no q/k norm, merger without mlp.4) against transformers'
    Qwen2_5_VLForConditionalGeneration, which derives its own MRoPE ids from the grids. TP=1 only:
    the tiny VLM's 3 heads do not split in two."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    x = multimodal_inputs()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny["qwen2_5_vl"], dtype=torch.float32).eval()
    # transformers 5 derives 3D positions only when told which tokens are image tokens (type 1).
    types = (x["tokens"] == hf.config.image_token_id).int()
    with torch.no_grad():
        ref = hf(input_ids=x["tokens"], pixel_values=x["images"].pixel_values, image_grid_thw=x["images"].grid_thw,
                 mm_token_type_ids=types).logits
    ours = runs["tp1"]["qwen2_5_vl_logits"]
    assert (ours[..., :ref.shape[-1]] - ref).abs().max() < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_multimodal_equals_padded(runs, tp):
    """Two samples packed into one THD row (MRoPE ids restarting per sample) give the padded logits."""
    assert runs[f"tp{tp}"]["mm_packed_diff"] < TOL


def test_pipeline_split_equals_single_stage(runs):
    first, last = runs["pp2"]
    assert first["has_vision"] and not last["has_vision"]
    assert first["layers"] == [1] and last["layers"] == [2, 3, 4]  # uneven: first_stage_layers=1
    vocab = tiny_model_config().language.vocab_size  # the pad columns beyond it are -inf
    assert (last["logits"][..., :vocab] - runs["tp1"]["mm_logits"][..., :vocab]).abs().max() < TOL


def test_pipeline_split_gradients_equal_single_stage(runs):
    """Backward through the split (input gradient sent back to the first stage) gives PP=1's
    gradients on both stages: ViT, projector, embedding, first and last decoder layers, output."""
    first, last = runs["pp2"]
    reference = runs["tp1"]["grads"]
    assert set(first["grads"]) | set(last["grads"]) == set(reference)
    for name, grad in {**first["grads"], **last["grads"]}.items():
        # float32 summation-order differences only: 1e-4 relative to the tensor's largest entry.
        scale = reference[name].abs().max()
        assert scale > 0 and (grad - reference[name]).abs().max() <= 1e-4 * scale, name


def test_virtual_pipeline_chunks(runs):
    """Interleaved layout: rank 0 holds layers 1 and 3 (ViT on its first chunk), rank 1 layers 2 and 4."""
    (r0c0, r0c1), (r1c0, r1c1) = runs["vpp"]
    assert [c["layers"] for c in (r0c0, r1c0, r0c1, r1c1)] == [[1], [2], [3], [4]]
    assert [c["vision"] for c in (r0c0, r0c1, r1c0, r1c1)] == [True, False, False, False]
    assert [c["output"] for c in (r0c0, r0c1, r1c0, r1c1)] == [False, False, False, True]


def test_pipeline_tied_output_layer_starts_as_embedding(runs):
    last = runs["pp2"][1]
    assert last["tied_copy_equal"] and last["tied_nonzero"]


@pytest.mark.parametrize("parts", [("vision",), ("vision", "language")])
def test_freeze_keeps_frozen_weights_and_trains_the_rest(runs, parts):
    res = runs["tp1"]["freeze"][parts]
    prefixes = {"vision": "vision_model.", "projector": "projector.", "language": "language_model."}
    frozen = tuple(prefixes[p] for p in parts)
    for name, changed in res["changed"].items():
        if name.startswith(frozen):
            assert not changed and not res["has_grad"][name], f"frozen {name} moved or got a gradient"
        else:
            assert changed, f"trainable {name} did not change after an optimizer step"
    for part, counts in res["counts"].items():
        trainable, frozen_count = counts["trainable"], counts["frozen"]
        assert (trainable == 0) == (part in parts) and (frozen_count == 0) == (part not in parts), (part, res["counts"])


def test_placeholder_count_mismatch_is_a_clear_error(runs):
    short, missing = runs["tp1"]["errors"]
    assert "give 43 embeddings" in short and "hold 42 image placeholder tokens" in short
    assert "42" not in missing and "43 image placeholder tokens but no images" in missing


def test_freeze_rejects_unknown_part():
    from qwen_merge_mcore.models.qwen_merge import freeze

    with pytest.raises(ValueError, match="unknown parts"):
        freeze(torch.nn.Module(), ["vit"])
