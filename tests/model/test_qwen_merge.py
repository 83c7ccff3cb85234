"""The Megatron Qwen-Merge model against transformers, across TP and PP (CPU, gloo, float32).

Three spawned runs serve every test here: TP=1 (world 1), TP=2 (world 2), and PP=2 with an uneven
first stage (world 2). Ranks return Megatron outputs; transformers references are computed in
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

from tests.model.references import (experiment_config, gather_vocab, hf_qwen3, hf_qwen3_mrope_logits,
                                    hf_qwen_merge_logits, multimodal_inputs, text_inputs,
                                    write_merged_checkpoint)

TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Rank-side cases
# --------------------------------------------------------------------------------------------

def _load(cfg, folder, **stage):
    from qwen_merge_mcore.checkpoint.mapping import load_hf_weights
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
    return {"mm_logits": logits, "mm_packed_diff": (packed - unpacked).abs().max().item()}


def _freeze_case(merged, parts: tuple[str, ...]) -> dict:
    """One AdamW step on the multimodal loss with `parts` frozen."""
    from qwen_merge_mcore.models.qwen_merge import parameter_counts

    cfg = experiment_config("qwen_merge", freeze=parts)
    model = _load(cfg, merged).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = multimodal_inputs()
    loss = model(x["tokens"], x["position_ids"], images=x["images"], labels=x["labels"]).mean()
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0).step()
    changed = {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    return {"changed": changed, "has_grad": grads, "counts": parameter_counts(model)}


def _tp_suite(tiny: dict, merged, tp: int) -> dict:
    out = {**_text_case(tiny, tp), **_multimodal_case(merged, tp)}
    if tp == 1:
        out["freeze"] = {parts: _freeze_case(merged, parts) for parts in (("vision",), ("vision", "language"))}
    return out


@torch.no_grad()
def _pipeline_suite(tiny: dict, merged) -> dict:
    """PP=2, first stage = ViT + projector + 1 decoder layer, last stage = 3 layers + output.
    Hidden states go between the ranks with gloo send/recv (Megatron's p2p needs CUDA)."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.models.qwen_merge import build_model

    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == 1
    cfg = experiment_config("qwen_merge", pp=2, first_stage_layers=1)
    model = _load(cfg, merged, pre_process=first, post_process=last)
    out = {"layers": [layer.layer_number for layer in model.language_model.decoder.layers],
           "has_vision": model.vision_model is not None}
    x = multimodal_inputs()
    seq, batch = x["tokens"].shape[1], x["tokens"].shape[0]
    if first:
        hidden = model(x["tokens"], x["position_ids"], images=x["images"])
        dist.send(hidden.contiguous(), dst=1)
    else:
        hidden = torch.empty(seq, batch, cfg.model.language.hidden_size)
        dist.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        out["logits"] = model(x["tokens"], x["position_ids"])

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


# --------------------------------------------------------------------------------------------
# Fixtures: references in this process, Megatron runs in spawned ones
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    return write_merged_checkpoint(tiny, tmp_path_factory.mktemp("qwen_merge"))


@pytest.fixture(scope="module")
def runs(tiny, merged, distributed):
    return {
        "tp1": distributed(_tp_suite, world_size=1, tp=1, args=(tiny, merged, 1))[0],
        "tp2": distributed(_tp_suite, world_size=2, tp=2, args=(tiny, merged, 2))[0],
        "pp2": distributed(_pipeline_suite, world_size=2, pp=2, args=(tiny, merged)),
    }


@pytest.fixture(scope="module")
def text_reference(tiny):
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

    x = text_inputs(tiny_model_config().language.vocab_size)
    with torch.no_grad():
        return {name: hf_qwen3(tiny[folder])(x["tokens"]).logits
                for name, folder in (("untied", "qwen3"), ("tied", "qwen3-tied"))}


@pytest.fixture(scope="module")
def multimodal_reference(tiny, merged):
    return hf_qwen_merge_logits(tiny, merged, multimodal_inputs())


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_text_logits_equal_transformers_qwen3(runs, text_reference, tp, tied):
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

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
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

    lang = tiny_model_config().language
    x = text_inputs(lang.vocab_size)
    qwen3 = hf_qwen3(tiny["qwen3"])
    with torch.no_grad():
        logits = hf_qwen3_mrope_logits(qwen3, lang, qwen3.model.embed_tokens(x["tokens"]), x["position_ids"])
    assert (logits - text_reference["untied"]).abs().max() < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_multimodal_logits_equal_reference(runs, multimodal_reference, tp):
    logits = runs[f"tp{tp}"]["mm_logits"]
    vocab = multimodal_reference.shape[-1]
    assert (logits[..., :vocab] - multimodal_reference).abs().max() < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_multimodal_equals_padded(runs, tp):
    """Two samples packed into one THD row (MRoPE ids restarting per sample) give the padded logits."""
    assert runs[f"tp{tp}"]["mm_packed_diff"] < TOL


def test_pipeline_split_equals_single_stage(runs):
    first, last = runs["pp2"]
    assert first["has_vision"] and not last["has_vision"]
    assert first["layers"] == [1] and last["layers"] == [2, 3, 4]  # uneven: first_stage_layers=1
    assert (last["logits"] - runs["tp1"]["mm_logits"]).abs().max() < TOL


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
    for part, (trainable, frozen_count) in res["counts"].items():
        assert (trainable == 0) == (part in parts) and (frozen_count == 0) == (part not in parts), (part, res["counts"])


def test_freeze_rejects_unknown_part():
    from qwen_merge_mcore.models.qwen_merge import freeze

    with pytest.raises(ValueError, match="unknown parts"):
        freeze(torch.nn.Module(), ["vit"])
