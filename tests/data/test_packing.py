"""First-fit-decreasing bins, a step's DP x M micro-batches, and the packed THD batch: boundaries,
labels, masks, positions, images."""

from __future__ import annotations

import pytest
import torch

from qwen_merge_mcore.batch import VisionInput
from qwen_merge_mcore.data.packing import PackedSample, assign_micro_batches, collate_packed, first_fit_decreasing
from qwen_merge_mcore.positions import mrope_position_ids, text_position_ids


def test_ffd_fills_to_capacity_exactly_and_is_deterministic():
    lengths = [10, 6, 4, 7, 3, 16, 1]
    bins = first_fit_decreasing(lengths, 16)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16 for b in bins)
    assert bins[0] == [5]  # exactly the capacity fits alone
    assert len(bins) == 3 and bins == first_fit_decreasing(lengths, 16)
    with pytest.raises(ValueError, match="exceeds the capacity"):
        first_fit_decreasing([17], 16)


def _sample(ids, mask, grids=()):
    pos = mrope_position_ids(torch.tensor(ids), torch.tensor(list(grids)).reshape(-1, 3), None,
                             image_token_id=6, video_token_id=7)
    return PackedSample("x", list(ids), list(mask), pos, image_grids=list(grids))


def _check_step(plan, lengths, capacity, dp, rounds=None):
    """Every sample exactly once, no micro-batch over capacity, exactly DP x M micro-batches."""
    assert len(plan) == dp and len({len(slots) for slots in plan}) == 1
    if rounds is not None:
        assert len(plan[0]) == rounds
    assert sorted(i for slots in plan for slot in slots for i in slot) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in slot) <= capacity for slots in plan for slot in slots)


@pytest.mark.parametrize("policy", ["first_fit_decreasing", "flop_balanced"])
def test_a_step_becomes_exactly_dp_x_m_micro_batches(policy):
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(300)]
    costs = [n * (1 + n / 4096) for n in lengths]  # per token + attention, as sample_flops grows
    for dp in (1, 2, 3, 7, 64, 300):
        plan = assign_micro_batches(lengths, 1024, dp, policy, costs=costs)
        ffd_rounds = -(-len(first_fit_decreasing(lengths, 1024)) // dp)
        _check_step(plan, lengths, 1024, dp)
        assert ffd_rounds <= len(plan[0]) <= ffd_rounds + (policy == "flop_balanced")  # the fewest rounds (or +1)
        assert plan == assign_micro_batches(lengths, 1024, dp, policy, costs=costs)  # every rank computes the same
    seven = -(-len(first_fit_decreasing(lengths, 1024)) // 7)  # 21 rounds; M a multiple of 4 (interleaved PP=4)
    plan = assign_micro_batches(lengths, 1024, 7, policy, multiple=4, costs=costs)
    _check_step(plan, lengths, 1024, 7)
    assert len(plan[0]) % 4 == 0 and len(plan[0]) >= seven
    few = assign_micro_batches([5, 6], 1024, 4, policy, costs=[5.0, 6.0])  # fewer samples than ranks: empty slots
    _check_step(few, [5, 6], 1024, 4, rounds=1)


def test_flop_balanced_packing_beats_ffd_on_a_skewed_step():
    """Short captions plus a few long samples with several large images (the ViT's work is uneven):
    FFD's per-rank compute strays far from the mean, the balanced assignment stays within 5 %."""
    import random

    from qwen_merge_mcore.data.packing import micro_batch_flops, sample_flops
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

    model, rng, dp, capacity = tiny_model_config(), random.Random(1), 8, 4096
    samples = [(rng.randint(40, 120), [(1, 8, 8)]) for _ in range(400)]
    samples += [(rng.randint(1000, 1800), [(1, 32, 32)] * 3) for _ in range(12)]
    lengths = [n for n, _ in samples]
    costs = [sample_flops(model, n, grids) for n, grids in samples]

    def straggler(policy):
        plan = assign_micro_batches(lengths, capacity, dp, policy, costs=costs)
        _check_step(plan, lengths, capacity, dp)
        ranks = [sum(micro_batch_flops(model, [lengths[i] for i in slot], [g for i in slot for g in samples[i][1]], 16)
                     for slot in slots) for slots in plan]
        return max(ranks) / (sum(ranks) / dp)

    ffd, balanced = straggler("first_fit_decreasing"), straggler("flop_balanced")
    assert balanced <= 1.05 < ffd, (balanced, ffd)


def test_collate_labels_masks_positions_and_padding():
    a = _sample([1, 11, 12, 2, 13, 14, 2], [0, 0, 0, 0, 1, 1, 1])
    b = _sample([1, 3, 6, 6, 6, 6, 4, 15, 2, 16, 2], [0] * 9 + [1, 1], grids=[(1, 4, 4)])
    pixels = VisionInput(torch.randn(16, 1176), torch.tensor([[1, 4, 4]]))
    batch = collate_packed([a, b], pad_id=0, pad_to_multiple_of=16, images=pixels)
    assert batch.tokens.shape == (1, 32)  # 18 tokens padded to a multiple of 16
    assert batch.cu_seqlens.tolist() == [0, 7, 32] and batch.cu_seqlens.dtype == torch.int32
    tokens, labels, mask = batch.tokens[0], batch.labels[0], batch.loss_mask[0]
    assert tokens[:18].tolist() == a.input_ids + b.input_ids and tokens[18:].eq(0).all()
    # Labels are the next token inside each sample; the last token of a sample predicts nothing.
    assert labels[:6].tolist() == a.input_ids[1:]
    assert mask[:7].tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert mask[7:18].tolist() == [0] * 8 + [1, 1, 0]
    assert mask[18:].eq(0).all() and batch.num_loss_tokens == 5
    # Positions restart per sample; the image takes a 2x2 merged grid.
    pos = batch.position_ids[:, 0]
    assert pos.shape == (3, 32)
    assert torch.equal(pos[:, :7], text_position_ids(7))
    assert torch.equal(pos[:, 7:18], b.position_ids)
    assert pos[:, 7].tolist() == [0, 0, 0] and pos[:, 9:13].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert batch.images is pixels


def test_collate_exact_fit_and_fixed_length():
    a = _sample(list(range(10, 26)), [1] * 16)
    batch = collate_packed([a], pad_id=0, pad_to_multiple_of=16)
    assert batch.tokens.shape == (1, 16) and batch.cu_seqlens.tolist() == [0, 16]
    fixed = collate_packed([a], pad_id=0, pad_to_multiple_of=16, pad_to=48)
    assert fixed.tokens.shape == (1, 48) and fixed.cu_seqlens.tolist() == [0, 48]
    with pytest.raises(ValueError, match="do not fit"):
        collate_packed([a], pad_id=0, pad_to_multiple_of=16, pad_to=8)
