"""Process entry of a training run: parallel state from the torchrun/Slurm environment, the
loop, a clean teardown, and the exit code the sbatch scripts act on."""

from __future__ import annotations

from ..config import ExperimentConfig
from .signals import EXIT_INTERRUPTED


def train_main(cfg: ExperimentConfig) -> int:
    """0 when the stage finished; EXIT_INTERRUPTED (75) when a signal stopped it after a checkpoint."""
    from .. import distributed
    from .loop import run_training

    distributed.initialize(cfg.parallel, seed=cfg.train.seed)
    try:
        summary = run_training(cfg)
    finally:
        distributed.destroy()
    return EXIT_INTERRUPTED if summary.interrupted else 0
