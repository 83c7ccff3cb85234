"""Process entry of a training run: parallel state from the torchrun/Slurm environment, the
loop, a clean teardown, and the exit code the sbatch scripts act on."""

from __future__ import annotations

from ..config import ExperimentConfig
from .signals import EXIT_INTERRUPTED


def train_main(cfg: ExperimentConfig) -> int:
    """0 when the stage finished; EXIT_INTERRUPTED (75) when a signal stopped it after a checkpoint."""
    from .. import distributed
    from ..data.check import check_sources
    from .checkpointing import check_pretrained, check_save_target
    from .data_source import tokenizer_dir
    from .loop import run_training

    check_launch(cfg)
    check_pretrained(cfg)  # before the tokenizer is looked up in it
    check_sources(cfg.data, tokenizer_dir(cfg))  # before any model is built
    check_save_target(cfg)
    distributed.initialize(cfg.parallel, seed=cfg.train.seed)
    try:
        summary = run_training(cfg)
    finally:
        distributed.destroy()
    return EXIT_INTERRUPTED if summary.interrupted else 0


def check_launch(cfg: ExperimentConfig) -> None:
    """A model-parallel config started as one plain process: say how to launch it."""
    from ..distributed import launched

    p = cfg.parallel
    if not launched() and p.model_parallel_size > 1:
        raise ValueError(
            f"this config needs at least {p.model_parallel_size} processes (TP {p.tensor_model_parallel_size} x PP "
            f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size}), one per device: launch with "
            f"`python -m qwen_merge_mcore.torchrun --nproc-per-node {p.model_parallel_size} -m qwen_merge_mcore "
            "train --config ...` "
            "or under Slurm with srun (slurm/stage*.sbatch)")
