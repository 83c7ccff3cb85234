"""Run the training loop on CPU ranks with the toy model and data (module-level, spawnable)."""

from __future__ import annotations

from qwen_merge_mcore.config import config_from_dict
from qwen_merge_mcore.training.loop import run_training
from qwen_merge_mcore.training.model_provider import ModelBuilder

from . import toy_model
from .toy_data import ToyData

TOY_BUILDER = ModelBuilder(toy_model.build_model, toy_model.freeze)


def toy_config(tp: int = 1, **sections) -> "ExperimentConfig":  # noqa: F821
    raw = {"model": {"preset": "tiny", "backend": "local"},
           "parallel": {"tensor_model_parallel_size": tp},
           "precision": {"params_dtype": "fp32"},
           "train": {"lr": 3e-3, "global_batch_size": 4, "micro_batch_size": 1, "train_iters": 8,
                     "lr_warmup_fraction": 0.0, "freeze": ["vision"], "engine": "cpu"},
           "logging": {"progress_bar": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def train_toy(cfg):
    summary = run_training(cfg, TOY_BUILDER, lambda c, r, n: ToyData(c, r, n))
    return summary
