"""Which training engine runs a config, and building it (the seam itself is in step.py)."""

from __future__ import annotations

import torch

from ..config import ConfigError, ExperimentConfig
from .cpu_engine import CPUEngine
from .gpu_engine import GPUEngine
from .step import Engine


def select_engine(cfg: ExperimentConfig) -> str:
    """`auto` -> `gpu` where CUDA is present. Refuses what the chosen engine cannot run, before
    anything is built."""
    name = cfg.train.engine
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "gpu" if cuda else "cpu"
    dtype = cfg.precision.params_dtype
    if name == "gpu":
        if not cuda:
            raise ConfigError("train.engine", "gpu needs CUDA (Megatron-Core DDP, distributed optimizer and "
                              "schedules allocate on the GPU); use train.engine=cpu or auto on this machine")
        if dtype == "fp16":
            # Megatron's dynamic loss scaler starts at 2^32 and skips every step that overflows
            # while it backs off: routine there, but train.max_nan_steps counts skipped steps as
            # failures. The recipe trains in bf16.
            raise ConfigError("precision.params_dtype", "fp16 is not supported by the GPU engine (its dynamic "
                              "loss scaler's overflow skips would count as non-finite steps); use bf16")
    else:
        if cfg.parallel.pipeline_model_parallel_size != 1:
            raise ConfigError("parallel.pipeline_model_parallel_size", "the CPU engine runs 1 only (Megatron-Core's "
                              "pipeline schedules need CUDA)")
        if dtype != "fp32":
            raise ConfigError("precision.params_dtype", f"the CPU engine trains in fp32; got {dtype}")
    return name


def build_engine(cfg: ExperimentConfig, models: list[torch.nn.Module]) -> Engine:
    return GPUEngine(cfg, models) if select_engine(cfg) == "gpu" else CPUEngine(cfg, models)
