"""The training iterator end to end: batches, determinism, DP sharding, resume, bad input."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch

from qwen_merge_mcore.batch import Batch
from qwen_merge_mcore.data import build_train_iterator
from qwen_merge_mcore.data.errors import TooManyBadSamples
from qwen_merge_mcore.positions import mrope_position_ids
from qwen_merge_mcore.testing.media import make_image, make_video, write_rows


def _rows(n, start=0, image=None):
    rows = []
    for i in range(start, start + n):
        words = " ".join(["apples"] * (i % 7 + 1))
        rows.append({"id": f"r{i}", "image": image or f"img/{i % 3}.{'png' if i % 2 else 'jpg'}",
                     "conversations": [{"from": "human", "value": f"<image>\nCount {i}."},
                                       {"from": "gpt", "value": f"There are {words}."}]})
    return rows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    (root / "img").mkdir()
    for i, (h, w) in enumerate([(60, 90), (120, 80), (30, 200)]):
        for ext, fmt in (("jpg", "JPEG"), ("png", "PNG")):
            (root / "img" / f"{i}.{ext}").write_bytes(make_image(h, w, fmt, seed=i))
    write_rows(root / "a.jsonl", _rows(30))
    write_rows(root / "b.parquet", [{"messages": [{"role": "user", "content": "<image>Read it."},
                                                  {"role": "assistant", "content": f"Text {i}."}],
                                     "images": [{"bytes": make_image(50, 70, "PNG", seed=i), "path": None}]}
                                    for i in range(12)])
    return root


def _iter(tokenizer, model_cfg, data_cfg, folder, **kw):
    cfg = data_cfg([{"path": str(folder / "a.jsonl"), "epochs": 1.0},
                    {"path": str(folder / "b.parquet"), "epochs": 1.5, "name": "ocr"}])
    kw.setdefault("step_samples", 16)
    return build_train_iterator(cfg, model_cfg, tokenizer, micro_batch_tokens=256, seed=kw.pop("seed", 3), **kw)


def _take(it, n):
    out = []
    for _ in range(n):
        batch = next(it)
        out.append((batch, list(it.last_row_ids)))
    return out


def test_batches_are_consistent(tokenizer, model_cfg, data_cfg, folder):
    it = _iter(tokenizer, model_cfg, data_cfg, folder)
    for batch, ids in _take(it, 6):
        assert isinstance(batch, Batch)
        s = batch.tokens.shape[1]
        assert s % 16 == 0 and s <= 256 and batch.cu_seqlens[-1] == s
        pads = (batch.tokens == model_cfg.image_token_id).sum()
        grid = batch.images.grid_thw
        assert pads == (grid.prod(-1) // 4).sum()  # one <|image_pad|> per merged patch
        assert batch.images.pixel_values.shape == (grid.prod(-1).sum(), 3 * 2 * 14 * 14)
        assert len(ids) == len(batch.cu_seqlens) - 1
        # Each segment's positions are that sample's own MRoPE ids (restarting at 0).
        cu, k = batch.cu_seqlens.tolist(), 0
        for a, b in zip(cu[:-1], cu[1:]):
            seg = batch.tokens[0, a:b]
            n_img = int((seg == 3).sum())  # <|vision_start|>
            real = int((seg != tokenizer.pad_token_id).sum())
            expected = mrope_position_ids(seg[:real], grid[k:k + n_img], None, image_token_id=6, video_token_id=7)
            assert torch.equal(batch.position_ids[:, 0, a:a + real], expected)
            k += n_img
        assert batch.loss_mask.sum() > 0 and (batch.loss_mask[0, batch.tokens[0] == 0] == 0).all()


def test_deterministic_and_one_pass_covers_every_sample(tokenizer, model_cfg, data_cfg, folder):
    a = [ids for _, ids in _take(_iter(tokenizer, model_cfg, data_cfg, folder), 8)]
    b = [ids for _, ids in _take(_iter(tokenizer, model_cfg, data_cfg, folder), 8)]
    c = [ids for _, ids in _take(_iter(tokenizer, model_cfg, data_cfg, folder, seed=4), 8)]
    assert a == b and a != c
    it = _iter(tokenizer, model_cfg, data_cfg, folder)
    seen = []
    while it.pass_index == 0:
        next(it)
        seen += it.last_row_ids if it.pass_index == 0 else []
    assert len(seen) == 30 + 18 and len({s for s in seen if s.startswith("a:")}) == 30
    assert len({s for s in seen if s.startswith("ocr:")}) == 12  # 1.5 epochs: 18 draws of 12 rows


def test_data_parallel_ranks_share_out_the_samples(tokenizer, model_cfg, data_cfg, folder):
    ranks = [_one_pass(_iter(tokenizer, model_cfg, data_cfg, folder, dp_rank=r, dp_size=2)) for r in range(2)]
    single = _one_pass(_iter(tokenizer, model_cfg, data_cfg, folder))
    assert sorted(ranks[0] + ranks[1]) == sorted(single)  # together, exactly one pass
    a0, a1 = ({i for i in ids if i.startswith("a:")} for ids in ranks)
    assert a0 and a1 and not a0 & a1  # each sample goes to one rank


def _one_pass(it):
    ids = []
    while True:
        next(it)
        if it.pass_index:
            return ids
        ids += it.last_row_ids


@pytest.mark.parametrize("consumed", [1, 3, 9])
def test_resume_continues_with_the_next_unseen_sample(tokenizer, model_cfg, data_cfg, folder, consumed):
    it = _iter(tokenizer, model_cfg, data_cfg, folder)
    _take(it, consumed)
    state = pickle.loads(pickle.dumps(it.state_dict()))
    expected = _take(it, 4)
    resumed = _iter(tokenizer, model_cfg, data_cfg, folder)
    resumed.load_state_dict(state)
    got = _take(resumed, 4)
    for (b1, ids1), (b2, ids2) in zip(expected, got):
        assert ids1 == ids2
        assert torch.equal(b1.tokens, b2.tokens) and torch.equal(b1.images.pixel_values, b2.images.pixel_values)


def test_video_sample(tokenizer, model_cfg, data_cfg, tmp_path):
    (tmp_path / "clip.webm").write_bytes(make_video(20, 64, 96, fps=10))
    write_rows(tmp_path / "v.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "video", "video": "clip.webm"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A moving pattern."}]}])
    cfg = data_cfg([{"path": str(tmp_path / "v.jsonl")}], video_max_pixels=56 * 84, video_fps=2.0)
    batch = next(build_train_iterator(cfg, model_cfg, tokenizer, seed=0))
    assert batch.images is None and batch.videos.grid_thw.tolist() == [[2, 4, 6]]  # 4 frames at 2 fps
    assert (batch.tokens == model_cfg.video_token_id).sum() == 2 * 2 * 3
    assert batch.videos.pixel_values.shape == (48, 1176)
    # The temporal position steps by tokens_per_second x seconds per patch = 2 x 1.
    vid = batch.position_ids[0, 0, batch.tokens[0] == model_cfg.video_token_id]
    assert sorted(set(vid.tolist())) == [vid.min().item(), vid.min().item() + 2]


def _bad_rows(folder):
    good = make_image(60, 90, "JPEG")
    truncated = good[:len(good) // 2]
    undecodable = bytearray(good)
    dht = undecodable.find(b"\xff\xc4")
    undecodable[dht + 5:dht + 21] = b"\xff" * 16
    (folder / "truncated.jpg").write_bytes(truncated)
    (folder / "undecodable.jpg").write_bytes(bytes(undecodable))
    long_answer = " ".join(["apples"] * 400)
    bad = [
        ("missing_file", {"id": "missing", "image": "img/nope.png",
                          "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}),
        ("bad_image", {"id": "truncated", "image": "truncated.jpg",
                       "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}),
        ("bad_image", {"id": "undecodable", "image": "undecodable.jpg",
                       "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]}),
        ("too_long", {"id": "long", "image": "img/0.jpg",
                      "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": long_answer}]}),
        ("image_token_mismatch", {"id": "mismatch", "image": "img/0.jpg", "conversations": [
            {"from": "human", "value": "<image>x<image>"}, {"from": "gpt", "value": "y"}]}),
        ("image_token_mismatch", {"id": "spoof", "image": "img/0.jpg", "conversations": [
            {"from": "human", "value": "<image>x<|image_pad|>"}, {"from": "gpt", "value": "y"}]}),
        ("malformed_row", {"id": "malformed", "conversations": [{"from": "human", "value": "only a question"}]}),
    ]
    return bad


def test_each_bad_input_is_skipped_counted_and_logged(tokenizer, model_cfg, data_cfg, folder, tmp_path, caplog):
    bad = _bad_rows(folder)
    path = tmp_path / "mixed.jsonl"
    write_rows(path, _rows(14) + [row for _, row in bad])
    with open(path, "a") as f:
        f.write("{this is not json\n")
    cfg = data_cfg([{"path": str(path), "data_root": str(folder)}], max_bad_fraction=0.5)
    it = build_train_iterator(cfg, model_cfg, tokenizer, micro_batch_tokens=256, seed=1, step_samples=64)
    with caplog.at_level(logging.WARNING, logger="qwen_merge_mcore.data"):
        ids = [i for _ in range(it.next_step()) for i in _take(it, 1)[0][1]]  # the one step
    assert len(ids) == 14 and all(i.split(":")[-1].startswith("r") for i in ids)
    expected = {"malformed_row": 2, "missing_file": 1, "bad_image": 2, "too_long": 1, "image_token_mismatch": 2}
    assert dict(it.bad.counts) == expected and it.bad.seen == 14 + 8
    for _, row in bad:
        assert any(f":{row['id']}" in r.getMessage() for r in caplog.records), row["id"]


def test_too_many_bad_samples_stop_with_a_clear_error(tokenizer, model_cfg, data_cfg, folder, tmp_path):
    path = tmp_path / "bad.jsonl"
    missing = {"image": "img/nope.png", "conversations": [{"from": "human", "value": "<image>x"},
                                                           {"from": "gpt", "value": "y"}]}
    write_rows(path, _rows(6) + [missing] * 4)
    cfg = data_cfg([{"path": str(path), "data_root": str(folder)}], max_bad_fraction=0.2)
    it = build_train_iterator(cfg, model_cfg, tokenizer, micro_batch_tokens=256, seed=1, step_samples=64)
    with pytest.raises(TooManyBadSamples, match=r"max_bad_fraction=0.2.*missing_file"):
        next(it)


def test_a_rank_without_samples_gets_an_empty_micro_batch_not_a_hang(tokenizer, model_cfg, data_cfg, folder,
                                                                     tmp_path):
    path = write_rows(tmp_path / "one.jsonl", _rows(1))
    cfg = data_cfg([{"path": path, "data_root": str(folder)}])
    first = build_train_iterator(cfg, model_cfg, tokenizer, dp_rank=0, dp_size=2)
    second = build_train_iterator(cfg, model_cfg, tokenizer, dp_rank=1, dp_size=2)
    assert first.next_step() == second.next_step() == 1  # the same M on both ranks
    assert next(first).loss_mask.sum() > 0 and first.last_row_ids == ["one:0:r0"]
    empty = next(second)  # padding only: it runs the step with the other rank, adding no loss tokens
    assert empty.loss_mask.sum() == 0 and second.last_row_ids == [] and empty.images is None


def test_a_mix_without_usable_samples_is_an_error_not_a_hang(tokenizer, model_cfg, data_cfg, folder, tmp_path):
    path = write_rows(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "only a question"}]}])
    cfg = data_cfg([{"path": path, "data_root": str(folder)}], max_bad_fraction=1.0)
    with pytest.raises(ValueError, match="a whole pass over the data mix gave no usable sample"):
        next(build_train_iterator(cfg, model_cfg, tokenizer))
