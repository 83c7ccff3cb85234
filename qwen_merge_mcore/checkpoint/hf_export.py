"""A Hugging Face folder written by the training ranks from the weights they hold
(`checkpoint.save_hf`), with `qmm mcore2hf`'s steps (`mcore2hf.plan_hf_tensors`, `write_unit`,
`copy_meta`), so the folder equals `qmm mcore2hf` of the checkpoint saved at the same step.

Collective over every rank. Each pipeline stage exports its own layers: per load unit (one decoder
layer, or one other tensor), the stage's tensor-parallel ranks of data-parallel rank 0 send their
slices (point to point, one at a time) to the stage's TP rank 0, which assembles the TP-free
tensors of that unit, converts them and writes them at their place in the output shards
(`ShardedSafetensorsWriter` lays the files out once, any rank writes into them). No rank holds
more than one unit beyond its own weights: the bound of `qmm mcore2hf`, which loads one unit at a
time (bench/bench_save_hf.py measures it). Other data-parallel ranks hold replicas and send
nothing. Rank 0 builds the folder under a temporary name and renames it once every tensor, the
index and the config are written.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..dtypes import torch_dtype
from ..utils.atomic import atomic_output_dir
from .common import model_state
from .hf_source import sharded_tensors, table_name
from .mapping import param_mappings
from .mcore2hf import copy_meta, default_dtype, load_unit, plan_hf_tensors, write_unit
from .safetensors_io import CheckpointError, ShardedSafetensorsWriter, preview


def _units(chunk) -> dict[str, list]:
    """This rank's (table name, offsets, global shape, sharded tensor) per load unit, in the order
    of the chunk's state dict (the same on every TP rank of a stage)."""
    units: dict[str, list] = {}
    for sh_ten in sharded_tensors(model_state([chunk])):
        name, offsets, shape = table_name(sh_ten)
        units.setdefault(load_unit(name), []).append((name, offsets, shape, sh_ten))
    return units


def _received(mine: list, described: list, tp_group):
    """(name, offsets, shape, data) of every slice of a unit on the stage's TP ranks: TP rank 0's
    own, then each other rank's, received one at a time (point to point, in the order sent)."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL sends from GPUs
    yield from mine
    for rank, pieces in enumerate(described[1:], start=1):
        src = dist.get_global_rank(tp_group, rank)
        for name, offsets, shape, local_shape, dtype in pieces:
            data = torch.empty(local_shape, dtype=dtype, device=device)
            dist.recv(data, src=src, group=tp_group)
            yield name, offsets, shape, data


def _assemble(pieces: Iterable[tuple[str, tuple, tuple, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TP-free tensors from the slices of a stage's TP ranks; every element covered once."""
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for name, offsets, shape, data in pieces:
        if name not in full:
            full[name], filled[name] = torch.empty(shape, dtype=data.dtype), 0
        index = tuple(slice(o, o + s) for o, s in zip(offsets, data.shape))
        full[name][index] = data.cpu()
        filled[name] += data.numel()
    short = [n for n, t in full.items() if filled[n] != t.numel()]
    if short:
        raise CheckpointError(f"the ranks' slices do not cover {', '.join(short)}")
    return full


def export_hf(chunks: list, out: str | Path, meta_dir: str | Path, cfg: ModelConfig, dtype: Optional[str] = None,
              max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write `out` (an HF folder) from this rank's model chunks; called by every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    meta_dir = Path(meta_dir)
    dtype = dtype or default_dtype(json.loads((meta_dir / "config.json").read_text()))
    out_dtype = torch_dtype(dtype)
    table = param_mappings(cfg, 1)
    by_name = {m.megatron: m for m in table}
    rank0 = dist.get_rank() == 0
    tp_group = ps.get_tensor_model_parallel_group()
    exporter = ps.get_data_parallel_rank(with_context_parallel=True) == 0  # DP > 0: replicas only
    writes = exporter and ps.get_tensor_model_parallel_rank() == 0
    units = [_units(chunk) for chunk in chunks] if exporter else []

    # The output plan needs every table entry's TP-free shape; each stage knows its own.
    shapes = {name: shape for chunk in units for unit in chunk.values() for name, _, shape, _ in unit} if writes else {}
    gathered: list = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(shapes, gathered, dst=0)
    box: list = [None, None]
    with atomic_output_dir(out, overwrite=True) if rank0 else contextlib.nullcontext() as tmp:
        if rank0:
            shapes = {k: v for s in gathered for k, v in s.items()}
            missing = [m.megatron for m in table if m.megatron not in shapes]
            unmapped = sorted(set(shapes) - set(by_name))
            if missing or unmapped:  # told to every rank, so that none waits for the others
                box = [None, f"cannot export {out}: no rank holds {preview(missing, 5)}" if missing else
                       f"cannot export {out}: no HF mapping for {preview(unmapped, 5)}"]
            else:
                box = [str(tmp), plan_hf_tensors(table, shapes, out_dtype)]
                ShardedSafetensorsWriter(tmp, box[1], max_shard_bytes)  # lays out the files
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            raise CheckpointError(box[1])
        writer = ShardedSafetensorsWriter(box[0], box[1], max_shard_bytes, create=False) if writes else None
        tp0 = dist.get_global_rank(tp_group, 0)
        for chunk in units:
            for unit in chunk.values():
                # Main replicas only: a TP-replicated norm is sent by TP rank 0 alone, a tied output
                # layer on the last stage not at all (the first stage's embedding is it).
                mine = [(name, offsets, shape, sh_ten.data.detach()) for name, offsets, shape, sh_ten in unit
                        if is_main_replica(sh_ten.replica_id)]
                described: list = [None] * dist.get_world_size(tp_group) if writes else None
                dist.gather_object([(n, o, s, tuple(d.shape), d.dtype) for n, o, s, d in mine], described,
                                   dst=tp0, group=tp_group)
                if writes:
                    full = _assemble(_received(mine, described, tp_group))
                    write_unit([by_name[n] for n in full], full, writer, out_dtype)
                    del full
                else:
                    for *_, data in mine:
                        dist.send(data.contiguous(), dst=tp0, group=tp_group)
        written: list = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object(sorted(writer.written) if writes else [], written, dst=0)
        if rank0:
            ShardedSafetensorsWriter(tmp, box[1], max_shard_bytes, create=False).close(
                written=[n for w in written for n in w])
            copy_meta(meta_dir, tmp, dtype)
    dist.barrier()  # the folder is in place for every rank
    return Path(out)
