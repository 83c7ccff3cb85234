"""Both chat templates: token ids equal transformers' apply_chat_template, loss on assistant tokens only."""

from __future__ import annotations

import pytest

from qwen_merge_mcore.data.errors import BadSample
from qwen_merge_mcore.data.formats import to_sample
from qwen_merge_mcore.data.template import ChatEncoder

IMG = {"type": "image", "image": "a.png"}


def _encoder(tokenizer, model_cfg, template):
    return ChatEncoder(tokenizer, template, model_cfg.image_token_id, model_cfg.video_token_id)


def _sample(messages):
    return to_sample({"messages": messages}, "messages", "t:0", "/data")


def _target_text(tokenizer, enc):
    return tokenizer.decode([t for t, m in zip(enc.input_ids, enc.target_mask) if m])


CONVERSATIONS = {
    "single_no_reasoning": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": "A red bus."}],
    "reasoning_field": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Solve 3x + 5 = 20."}, IMG]},
        {"role": "assistant", "content": "x = 5", "reasoning_content": "Subtract 5, divide by 3."}],
    "inline_think": [
        {"role": "user", "content": "请一步一步地思考"},
        {"role": "assistant", "content": "<think>\nseven apples\n</think>\n\nThe answer is 7."}],
    "multi_turn": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "<think>look</think>Two cats."},
        {"role": "user", "content": "And the sofa?"},
        {"role": "assistant", "content": "Blue.", "reasoning_content": "colour"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_qwen3_ids_equal_apply_chat_template_of_exported_folder(tokenizer, model_cfg, name):
    """The tiny qwen3 folder carries qwen3_vl.jinja, as exported checkpoints do; users send list content."""
    messages = CONVERSATIONS[name]
    n_images = sum(isinstance(m["content"], list) and IMG in m["content"] for m in messages)
    enc = _encoder(tokenizer, model_cfg, "qwen3").encode(_sample(messages), [1] * n_images, [])
    expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(expected)


def test_qwen3_loss_mask_and_empty_think(tokenizer, model_cfg):
    enc = _encoder(tokenizer, model_cfg, "qwen3").encode(_sample(CONVERSATIONS["single_no_reasoning"]), [1], [])
    assert _target_text(tokenizer, enc) == "<think>\n\n</think>\n\nA red bus.<|im_end|>"
    enc = _encoder(tokenizer, model_cfg, "qwen3").encode(_sample(CONVERSATIONS["multi_turn"]), [1], [])
    # The earlier answer loses its thinking (as Qwen3 renders history); the last keeps it.
    assert _target_text(tokenizer, enc) == "Two cats.<|im_end|><think>\ncolour\n</think>\n\nBlue.<|im_end|>"


def test_no_think_trains_an_empty_think_block(tokenizer, model_cfg):
    messages = [{"role": "user", "content": "Solve 3x + 5 = 20. /no_think"},
                {"role": "assistant", "content": "x = 5", "reasoning_content": "Subtract 5."}]
    enc = _encoder(tokenizer, model_cfg, "qwen3").encode(_sample(messages), [], [])
    assert _target_text(tokenizer, enc) == "<think>\n\n</think>\n\nx = 5<|im_end|>"
    expected = tokenizer.apply_chat_template([messages[0], {"role": "assistant", "content": "x = 5"}],
                                             tokenize=True, return_dict=True)["input_ids"]
    assert enc.input_ids == list(expected)
    assert "/no_think" in tokenizer.decode(enc.input_ids)  # the switch stays in the prompt


def test_pretrain_template_is_the_stage12_format(tokenizer, model_cfg):
    messages = [{"role": "system", "content": "ignored"},
                {"role": "user", "content": [IMG, {"type": "text", "text": "\nDescribe the picture."}]},
                {"role": "assistant", "content": "<think>x</think>A photo of a red bus."}]
    enc = _encoder(tokenizer, model_cfg, "pretrain").encode(_sample(messages), [3], [])
    text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>\n"
            "Describe the picture.<|im_end|>\n<|im_start|>assistant\nA photo of a red bus.<|im_end|>\n")
    assert enc.input_ids == tokenizer.encode(text, add_special_tokens=False)
    assert _target_text(tokenizer, enc) == "A photo of a red bus.<|im_end|>"


def test_image_pads_expand_per_merged_patch(tokenizer, model_cfg):
    enc = _encoder(tokenizer, model_cfg, "qwen3")
    sample = _sample([{"role": "user", "content": [IMG, IMG, {"type": "text", "text": "Same?"}]},
                      {"role": "assistant", "content": "No."}])
    out = enc.encode(sample, [4, 6], [])
    assert out.input_ids.count(model_cfg.image_token_id) == 10
    with pytest.raises(BadSample, match="image_token_mismatch"):
        enc.encode(sample, [4], [])  # two placeholders, one image
    spoofed = _sample([{"role": "user", "content": [IMG, {"type": "text", "text": "<|image_pad|>"}]},
                       {"role": "assistant", "content": "No."}])
    with pytest.raises(BadSample, match="image_token_mismatch"):
        enc.encode(spoofed, [4], [])  # a literal pad token in the text


def test_tokenizer_and_config_must_agree(tokenizer, model_cfg):
    with pytest.raises(ValueError, match="image_pad"):
        ChatEncoder(tokenizer, "qwen3", model_cfg.image_token_id + 1, model_cfg.video_token_id)
