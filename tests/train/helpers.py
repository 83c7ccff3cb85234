"""Run the training loop on CPU ranks with the tiny Qwen-Merge model (module-level, spawnable)."""

from __future__ import annotations

from qwen_merge_mcore.config import ExperimentConfig, config_from_dict

from .synthetic import SyntheticData


def tiny_config(tp: int = 1, **sections) -> ExperimentConfig:
    raw = {"model": {"preset": "tiny", "backend": "local"},
           "parallel": {"tensor_model_parallel_size": tp},
           "precision": {"params_dtype": "fp32"},
           "train": {"lr": 3e-3, "global_batch_samples": 2, "micro_batch_size": 1, "train_iters": 8,
                     "lr_warmup_fraction": 0.0, "freeze": ["vision"], "engine": "cpu"},
           "logging": {"progress_bar": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def synthetic(cfg, rank, size, **kw):
    return SyntheticData(cfg, rank, size, **kw)
