"""MRoPE position ids equal transformers' Qwen2.5-VL rule for images and text."""

import pytest
import torch

from qwen_merge_mcore.positions import mrope_position_ids, text_position_ids

IMG, VID = 6, 7


def _hf_rope_index(ids, image_grid):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID)
    mm = (ids == IMG).int()
    return Qwen2_5_VLModel.get_rope_index(type("M", (), {"config": cfg, "get_vision_position_ids":
                                                          Qwen2_5_VLModel.get_vision_position_ids})(),
                                          ids.unsqueeze(0), mm.unsqueeze(0), image_grid_thw=image_grid)[0][:, 0]


def test_images_match_transformers():
    grids = torch.tensor([[1, 4, 6], [1, 8, 4]])  # 6 and 8 merged tokens, one non-square
    ids = torch.tensor([1, 20, 3] + [IMG] * 6 + [4, 21, 22, 3] + [IMG] * 8 + [4, 23, 2])
    ours = mrope_position_ids(ids, grids, image_token_id=IMG, video_token_id=VID)
    assert torch.equal(ours, _hf_rope_index(ids, grids))
    assert ours[:, 3].tolist() == [3, 3, 3] and ours[:, 8].tolist() == [3, 4, 5]
    assert ours[:, 9].tolist() == [6, 6, 6]  # text resumes at max + 1


def test_text_only_is_1d():
    ids = torch.tensor([5, 6 + 10, 30, 2])
    assert torch.equal(mrope_position_ids(ids, image_token_id=IMG, video_token_id=VID), text_position_ids(4))


def test_video_temporal_interval():
    grids = torch.tensor([[2, 4, 4]])  # 2 temporal patches of 2x2 merged tokens
    ids = torch.tensor([1] + [VID] * 8 + [2])
    pos = mrope_position_ids(ids, video_grid_thw=grids, second_per_grid_ts=[1.0], image_token_id=IMG,
                             video_token_id=VID, tokens_per_second=2)
    assert pos[0, 1:9].tolist() == [1, 1, 1, 1, 3, 3, 3, 3]  # interval = 2 tokens/s x 1 s
    assert pos[:, 9].tolist() == [4, 4, 4]


def test_mismatched_placeholders_are_refused():
    with pytest.raises(ValueError, match="needs 6 placeholder tokens, found a run of 5"):
        mrope_position_ids(torch.tensor([1] + [IMG] * 5 + [2]), torch.tensor([[1, 4, 6]]),
                           image_token_id=IMG, video_token_id=VID)
    with pytest.raises(ValueError, match="2 image grids but 1"):
        mrope_position_ids(torch.tensor([1] + [IMG] * 6 + [2]), torch.tensor([[1, 4, 6], [1, 4, 6]]),
                           image_token_id=IMG, video_token_id=VID)
