"""The training loop's data source: the seam to the data pipeline (per step, `next_step()` gives
this data-parallel rank's micro-batch count M, the same on every rank, then `next()` its M
micro-batches, `Batch`; `state_dict()` / `load_state_dict()` for the sample position; `len()`
steps per pass), the tokenizer it uses, and how many steps a run takes."""

from __future__ import annotations

import math
from typing import Iterator, Protocol

from ..batch import Batch
from ..config import ExperimentConfig


class DataSource(Protocol):
    def next_step(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_data(cfg: ExperimentConfig, dp_rank: int, dp_size: int, vision_cache=None) -> DataSource:
    """The data pipeline's packed-sequence iterator for this DP rank (one sequence per micro-batch;
    each step takes train.global_batch_samples samples); `vision_cache`: the ViT feature cache
    (data/vision_cache.py) its images are looked up in."""
    import torch
    from megatron.core import parallel_state

    from ..data.loader import build_train_iterator
    from .pipeline_media import PipelineKeptSamples

    # Pipeline stages after the first skip decoding (see pipeline_media.py).
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    # Megatron's interleaved schedule runs M in groups of PP micro-batches.
    interleaved = (cfg.parallel.virtual_pipeline_model_parallel_size or 1) > 1
    return build_train_iterator(cfg.data, cfg.model, tokenizer_dir(cfg), dp_rank=dp_rank, dp_size=dp_size,
                                seed=cfg.train.seed, step_samples=cfg.train.global_batch_samples,
                                device_id=torch.cuda.current_device() if torch.cuda.is_available() else None,
                                decode_media=parallel_state.is_pipeline_first_stage(),
                                kept_samples=PipelineKeptSamples() if pp > 1 else None,
                                microbatch_multiple=pp if interleaved else 1, freeze=cfg.train.freeze,
                                vision_cache=vision_cache)


def tokenizer_dir(cfg: ExperimentConfig) -> str:
    """data.tokenizer, else the `hf_meta/` of the checkpoint the run starts from."""
    from .checkpointing import find_hf_meta

    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    meta = find_hf_meta(cfg.checkpoint.pretrained, cfg.checkpoint.save)
    if meta is not None and (meta / "tokenizer_config.json").is_file():
        return str(meta)
    raise ValueError("no tokenizer: set data.tokenizer to the Hugging Face model folder, or start from a "
                     "checkpoint written by `qmm hf2mcore` (it carries hf_meta/ with the tokenizer)")


def train_iters(cfg: ExperimentConfig, data: DataSource) -> int:
    """`train.train_iters`, or `train.epochs` over the data's steps per pass (len())."""
    if cfg.train.train_iters is not None:
        return cfg.train.train_iters
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("train.epochs needs a data source that knows its length; set train.train_iters") from None
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


class Recorder:
    """Passes micro-batches through and keeps them, so the step's FLOPs and tokens can be counted."""

    def __init__(self, source: Iterator[Batch]):
        self.source, self.batches = source, []

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = next(self.source)
        self.batches.append(batch)
        return batch
