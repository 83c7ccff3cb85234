"""What the converters, `qmm compare` and the training checkpoints share.

- `hf_meta/`: the HF folder's files other than the weights (config, tokenizer, processor, chat
  template, remote code). `qmm hf2mcore` stores it in its output, training checkpoints carry it
  on, `qmm mcore2hf` copies it back.
- This rank's model chunks (one per virtual pipeline stage) and their sharded state dict as
  Megatron training saves it (`model`, or `model0..` per chunk).
- Loading a torch_dist checkpoint. Keys are the te spec's, whatever backend wrote them (the local
  spec maps its norms onto them, see models/specs.py). Checkpoints written before that hold the
  local spec's own norm names; `load_sharded` reads them under those names (the one translation
  of older layouts), and leaves Transformer Engine's `_extra_state` (FP8 scaling history) at its
  initial value when a checkpoint written by the local spec has none.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..config import ExperimentConfig, ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
from ..hf_config import model_config_from_hf
from .safetensors_io import INDEX, SINGLE, CheckpointError
from .stored import stored_key
from .verify import verify_files_collective, verify_sizes

HF_META = "hf_meta"
EXTRA_STATE = "_extra_state"


# ---------------------------------------------------------------------------------------------
# HF folders and hf_meta/
# ---------------------------------------------------------------------------------------------

def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder: config.json and safetensors weights (one file or an index)."""
    path = Path(path)
    return (path / "config.json").is_file() and ((path / INDEX).is_file() or (path / SINGLE).is_file())


def copy_hf_meta(hf_dir: str | Path, dest: str | Path) -> None:
    """Everything but the weights: config, tokenizer, chat template, processor, remote code."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(hf_dir).iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX:
            shutil.copy2(path, dest / path.name)


def read_model_config(config_json: str | Path) -> tuple[dict, ModelConfig]:
    """The raw HF config and our ModelConfig from it; a CheckpointError naming the file otherwise."""
    config_json = Path(config_json)
    if not config_json.is_file():
        raise CheckpointError(f"{config_json.parent} has no config.json")
    hf = json.loads(config_json.read_text())
    try:
        return hf, model_config_from_hf(hf)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{config_json}: cannot read the model config ({err})") from None


def checkpoint_model_config(ckpt_dir: str | Path) -> tuple[dict, ModelConfig]:
    """The model config a torch_dist checkpoint carries in its `hf_meta/`."""
    meta = Path(ckpt_dir) / HF_META / "config.json"
    if not meta.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {HF_META}/config.json (was it written by `qmm hf2mcore` or "
                              "by training from such a checkpoint?)")
    return read_model_config(meta)


# ---------------------------------------------------------------------------------------------
# Model chunks and their sharded state
# ---------------------------------------------------------------------------------------------

def converter_experiment(cfg: ModelConfig, parallel: ParallelConfig, dtype: str) -> ExperimentConfig:
    """The experiment config a converter builds the model with (nothing trains, nothing frozen)."""
    return ExperimentConfig(model=cfg, parallel=parallel, precision=PrecisionConfig(params_dtype=dtype),
                            train=TrainConfig(train_iters=1, freeze=[]))


def model_chunks(exp: ExperimentConfig, build: Optional[Callable] = None) -> list:
    """This rank's model chunks, one per virtual pipeline stage, from `build(exp, pre_process,
    post_process, vp_stage)` (default: the Qwen-Merge model). Inside `torch.device("meta")` they
    have no storage: what the converters plan with."""
    from megatron.core import parallel_state as ps

    if build is None:
        from ..models.qwen_merge import build_model as build
    vpp = exp.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp in range(vpp) if vpp > 1 else [None]:
        chunks.append(build(exp, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp_stage=vp))
    return chunks


def model_state(chunks: list) -> dict:
    """The sharded state dict as Megatron training saves it: `model`, or `model0..` per VP stage."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class single_process_group:
    """Megatron's loader runs collectives; a one-process gloo group serves them when none exists."""

    def __enter__(self):
        import torch.distributed as dist

        self.owner = not dist.is_initialized()
        if self.owner:
            self.tmp = tempfile.mkdtemp(prefix="qmm-pg-")
            dist.init_process_group("gloo", init_method=f"file://{self.tmp}/store", rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.owner:
            dist.destroy_process_group()
            shutil.rmtree(self.tmp, ignore_errors=True)


def load_sharded(template: dict, ckpt_dir: str | Path) -> dict:
    """`dist_checkpointing.load(template, ckpt_dir)` (collective) for checkpoints of any layout
    and age. Returns the loaded state dict; TE `_extra_state` entries the checkpoint lacks are
    absent from it (`load_model` keeps the module's own)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensor
    from megatron.core.dist_checkpointing.validation import StrictHandling

    verify_sizes(ckpt_dir)
    stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    mismatched = []
    for item in nested_values(template):
        if isinstance(item, ShardedBase) and item.key not in stored:
            item.key = stored_key(item.key, stored)
        there = getattr(stored.get(item.key), "global_shape", None) if isinstance(item, ShardedTensor) else None
        if there is not None and tuple(there) != tuple(item.global_shape):
            mismatched.append(f"{item.key} is {tuple(there)} there, {tuple(item.global_shape)} here")
    if mismatched:  # torch's own error is a multi-KB traceback from inside its load plan
        raise CheckpointError(f"{ckpt_dir}: holds a different model: {mismatched[0]}"
                              f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}; "
                              "does the model config match that checkpoint?")
    loaded, _, unexpected = dist_checkpointing.load(template, str(ckpt_dir),
                                                 strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in unexpected if not k.endswith(EXTRA_STATE))
    if absent:
        raise CheckpointError(f"{ckpt_dir}: the checkpoint has no tensor for {len(absent)} entries of this model: "
                              f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''} (a different "
                              "model config?)")
    return loaded


def load_model(chunks: list, ckpt_dir: str | Path) -> None:
    """Load this rank's model chunks from a torch_dist checkpoint at any layout (collective),
    after checking its files against `convert_manifest.json` (when it has one)."""
    verify_files_collective(ckpt_dir)
    template = model_state(chunks)
    loaded = load_sharded(template, ckpt_dir)
    for name, chunk in zip(template, chunks):
        load_model_chunk(chunk, loaded[name])


def load_model_chunk(chunk, state: dict) -> None:
    """`chunk.load_state_dict(state)`, where only TE's `_extra_state` may be missing."""
    result = chunk.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint state does not fit the model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
