"""Fixtures of the data tests: the tiny tokenizer and model config, generated images and rows."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["qwen3"])


@pytest.fixture(scope="session")
def model_cfg():
    from qwen_merge_mcore.fixtures.tiny import tiny_model_config

    return tiny_model_config()


@pytest.fixture
def data_cfg():
    """A DataConfig with small pixel budgets (few patches, fast tests); datasets added per test."""
    from qwen_merge_mcore.config.schema import DataConfig

    def make(datasets, **kw):
        from qwen_merge_mcore.config.schema import DatasetConfig

        kw.setdefault("max_pixels", 112 * 112)
        kw.setdefault("seq_length", 512)
        kw.setdefault("template", "qwen3")
        kw.setdefault("max_bad_fraction", 0.5)
        cfg = DataConfig(datasets=[d if isinstance(d, DatasetConfig) else DatasetConfig(**d) for d in datasets], **kw)
        cfg.validate()
        return cfg

    return make
