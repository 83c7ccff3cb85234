"""The training loop's data source: the seam to the data pipeline (an endless iterator of
micro-batches, `Batch`, for this data-parallel rank, with `state_dict()` / `load_state_dict()` for
the sampler position), the tokenizer it uses, and how many micro-batches and steps a run takes."""

from __future__ import annotations

import math
from typing import Iterator, Protocol

from ..batch import Batch
from ..config import ExperimentConfig


class DataSource(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def build_data(cfg: ExperimentConfig, dp_rank: int, dp_size: int, vision_cache=None) -> DataSource:
    """The data pipeline's packed-sequence iterator for this DP rank (one sequence per micro-batch);
    `vision_cache`: the ViT feature cache (data/vision_cache.py) its images are looked up in."""
    import torch
    from megatron.core import parallel_state

    from ..data.loader import build_train_iterator
    from .pipeline_media import PipelineKeptSamples

    if cfg.train.micro_batch_size != 1:
        raise ValueError("packed training takes one packed sequence per micro-batch: set train.micro_batch_size=1 "
                         "and size micro-batches with data.seq_length")
    # Pipeline stages after the first skip decoding (see pipeline_media.py).
    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    return build_train_iterator(cfg.data, cfg.model, tokenizer_dir(cfg), dp_rank=dp_rank, dp_size=dp_size,
                                seed=cfg.train.seed,
                                device_id=torch.cuda.current_device() if torch.cuda.is_available() else None,
                                decode_media=parallel_state.is_pipeline_first_stage(),
                                kept_samples=PipelineKeptSamples() if pipelined else None,
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


def num_microbatches(cfg: ExperimentConfig, dp_size: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x "
                         f"data-parallel size = {t.micro_batch_size} x {dp_size}")
    return t.global_batch_size // per_step


def train_iters(cfg: ExperimentConfig, data: DataSource, microbatches: int) -> int:
    """`train.train_iters`, or `train.epochs` over the data's micro-batches per epoch (len())."""
    if cfg.train.train_iters is not None:
        return cfg.train.train_iters
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("train.epochs needs a data source that knows its length; set train.train_iters") from None
    return max(1, math.ceil(cfg.train.epochs * per_epoch / microbatches))


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
