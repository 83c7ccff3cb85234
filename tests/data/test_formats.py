"""Every row layout, in JSONL and parquet, with image paths and image bytes; the weighted mix."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from qwen_merge_mcore.data.errors import BadSample
from qwen_merge_mcore.data.formats import to_sample
from qwen_merge_mcore.data.mixture import Mixture
from qwen_merge_mcore.data.readers import open_rows
from qwen_merge_mcore.testing.media import make_image, write_rows

Q, A = "Describe the picture.", "A red bus."


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    data = make_image(60, 90, "PNG")
    (root / "img").mkdir()
    (root / "img" / "a.png").write_bytes(data)
    return root, data


def _layouts(data: bytes):
    """(format, extension, row) for every supported layout; each means 'image then Q -> A'."""
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    hf_image = {"bytes": data, "path": "a.png"}  # what HF `datasets` writes into parquet
    return [
        ("messages", "jsonl", {"id": "m1", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": Q}]},
            {"role": "assistant", "content": A}]}),
        ("messages", "jsonl", {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": Q}]},
            {"role": "assistant", "content": [{"type": "text", "text": A}]}]}),
        ("messages", "parquet", {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/a.png"}, "text": None},
                                         {"type": "text", "image_url": None, "text": Q}]},
            {"role": "assistant", "content": [{"type": "text", "image_url": None, "text": A}]}]}),
        ("sharegpt", "jsonl", {"id": "0001", "image": "img/a.png", "conversations": [
            {"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}]}),
        ("sharegpt", "parquet", {"id": "0002", "image": hf_image, "conversations": [
            {"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}]}),
        ("llamafactory", "parquet", {"messages": [
            {"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}],
            "images": [hf_image]}),
        ("llamafactory", "jsonl", {"messages": [
            {"role": "user", "content": Q}, {"role": "assistant", "content": A}], "images": ["img/a.png"]}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_every_layout_reads_to_the_same_conversation(media, tmp_path, case, tokenizer, model_cfg):
    from qwen_merge_mcore.data.template import ChatEncoder

    root, data = media
    fmt, ext, row = _layouts(data)[case]
    path = write_rows(tmp_path / f"rows.{ext}", [row, row])
    rows = open_rows(path)
    assert len(rows) == 2
    for detect in (fmt, "auto"):
        sample = to_sample(rows[1], detect, "ds:1", str(root))
        assert len(sample.images) == 1
        image = sample.images[0]
        assert (image if isinstance(image, bytes) else open(image, "rb").read()) == data
        enc = ChatEncoder(tokenizer, "pretrain", model_cfg.image_token_id, model_cfg.video_token_id)
        ids = enc.encode(sample, [2], []).input_ids
        text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>" + Q +
                "<|im_end|>\n<|im_start|>assistant\n" + A + "<|im_end|>\n")
        assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_video_parts_and_tags(tmp_path):
    s = to_sample({"messages": [{"role": "user", "content": [{"type": "video", "video": "v.webm"},
                                                              {"type": "text", "text": "What happens?"}]},
                                {"role": "assistant", "content": "It moves."}]}, "auto", "d:0", "/r")
    assert s.videos == ["/r/v.webm"] and s.messages[0].parts[0].type == "video"
    s = to_sample({"conversations": [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "X"}],
                   "video": "/abs/v.mp4"}, "auto", "d:1", "/r")
    assert s.videos == ["/abs/v.mp4"]


@pytest.mark.parametrize("row,reason", [
    ("just a string", "malformed_row"),
    ({"text": "no conversation"}, "malformed_row"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "malformed_row"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}, "malformed_row"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}, "malformed_row"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}, "malformed_row"),
    ({"conversations": [{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}],
      "image": "a.png"}, "image_token_mismatch"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
      "images": []}, "image_token_mismatch"),
])
def test_malformed_rows_are_named(row, reason):
    with pytest.raises(BadSample) as err:
        to_sample(row, "auto", "d:7", "/r")
    assert err.value.reason == reason


def test_llava_json_list_file(tmp_path):
    import json

    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]}] * 3))
    rows = open_rows(str(path))
    assert len(rows) == 3 and to_sample(rows[2], "auto", "llava:2", "/r").images == ["/r/x.png"]


def test_invalid_json_line_is_a_malformed_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"messages": []}\n{broken json\n')
    rows = open_rows(str(path))
    with pytest.raises(BadSample, match="malformed_row"):
        rows[1]


def test_mixture_counts_epochs_and_determinism():
    mix = Mixture([10, 4, 3], epochs=[1.0, 2.5, 1.0], weights=[None] * 3, seed=7)
    order = mix.order(0)
    assert len(order) == len(mix) == 10 + 10 + 3
    per = np.bincount(order[:, 0], minlength=3)
    assert per.tolist() == [10, 10, 3]
    # Dataset 1: two full epochs (each row twice) plus 2 of a third.
    counts = np.bincount(order[order[:, 0] == 1, 1], minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]
    assert np.array_equal(order, Mixture([10, 4, 3], [1.0, 2.5, 1.0], [None] * 3, seed=7).order(0))
    assert not np.array_equal(order, mix.order(1))
    # Spread evenly: every dataset shows up in both halves.
    for half in (order[:len(order) // 2], order[len(order) // 2:]):
        assert set(half[:, 0].tolist()) == {0, 1, 2}


def test_mixture_weights_set_the_ratio():
    mix = Mixture([1000, 1000], epochs=[1.0, 1.0], weights=[3.0, 1.0], seed=0)
    first = mix.order(0)[:400, 0]
    # Dataset 0 is drawn 3x as often while both last: 300 of the first 400 give or take noise.
    assert 270 <= (first == 0).sum() <= 330
    with pytest.raises(ValueError, match="every dataset or on none"):
        Mixture([1, 1], [1, 1], [2.0, None], seed=0)
