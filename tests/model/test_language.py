"""The Megatron Qwen3 language model against transformers' Qwen3ForCausalLM (text only).

Tolerance 1e-4 on logits: both sides run float32 from the same bf16 weights; the remaining
differences are float32 summation order (fused vs split q/k/v and gate/up GEMMs, TP partial
sums), observed ~1e-6 here, with logits of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.model.references import experiment_config, gather_vocab, hf_qwen3

TOL = 1e-4


def _language_cases(tiny: dict, tp: int) -> dict:
    from qwen_merge_mcore.checkpoint.mapping import load_hf_weights
    from qwen_merge_mcore.models.qwen_merge import build_model
    from qwen_merge_mcore.positions import text_position_ids

    torch.manual_seed(0)
    out = {}
    for tied in (False, True):
        cfg = experiment_config("qwen3", tied=tied, tp=tp)
        model = build_model(cfg).eval()
        load_hf_weights(model, tiny["qwen3-tied" if tied else "qwen3"], cfg.model)
        hf = hf_qwen3(tiny["qwen3-tied" if tied else "qwen3"])
        vocab = cfg.model.language.vocab_size

        tokens = torch.randint(10, vocab, (2, 12))
        positions = text_position_ids(12).unsqueeze(1).expand(3, 2, 12)
        with torch.no_grad():
            logits = gather_vocab(model(tokens, positions))
            ref = hf(tokens).logits
            labels = torch.randint(0, vocab, (2, 12))
            loss = model(tokens, positions, labels=labels)
        name = "tied" if tied else "untied"
        out[f"{name}_logits"] = (logits[..., :vocab] - ref).abs().max().item()
        out[f"{name}_pad_is_neg_inf"] = bool(torch.isneginf(logits[..., vocab:]).all()) and logits.shape[-1] > vocab
        ref_loss = F.cross_entropy(ref.flatten(0, 1), labels.flatten(), reduction="none").view(2, 12)
        out[f"{name}_loss"] = (loss - ref_loss).abs().max().item()

        # Packed: two samples end to end (positions restart), THD attention, equal to separate runs.
        a, b = torch.randint(10, vocab, (1, 7)), torch.randint(10, vocab, (1, 5))
        packed_pos = torch.cat([text_position_ids(7), text_position_ids(5)], dim=1).unsqueeze(1)
        cu = torch.tensor([0, 7, 12], dtype=torch.int32)
        with torch.no_grad():
            packed = gather_vocab(model(torch.cat([a, b], 1), packed_pos, cu_seqlens=cu))
            separate = torch.cat([gather_vocab(model(a, text_position_ids(7)[:, None])),
                                  gather_vocab(model(b, text_position_ids(5)[:, None]))], dim=1)
        out[f"{name}_packed"] = (packed[..., :vocab] - separate[..., :vocab]).abs().max().item()
    return out


@pytest.fixture(scope="module")
def language_results(tiny, distributed):
    return {tp: distributed(_language_cases, world_size=tp, tp=tp, args=(tiny, tp))[0] for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_text_logits_equal_transformers_qwen3(language_results, tp, tied):
    res = language_results[tp]
    assert res[f"{tied}_logits"] < TOL
    assert res[f"{tied}_pad_is_neg_inf"], "padded vocabulary rows must never be predicted"
    assert res[f"{tied}_loss"] < TOL  # vocab-parallel CE over the padded vocab = CE over the real one


@pytest.mark.parametrize("tp", [1, 2])
def test_packed_thd_equals_separate_samples(language_results, tp):
    for tied in ("untied", "tied"):
        assert language_results[tp][f"{tied}_packed"] < TOL
