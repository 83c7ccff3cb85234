"""Megatron-Core torch_dist checkpoint -> Hugging Face folder, one layer in memory at a time.

Megatron's `dist_checkpointing.load` is asked for a few global tensors at a time (one decoder
layer's parameters, or one embedding): it reads and reassembles them from however many TP/PP/VPP
shards wrote them. The mapping table turns each into HF tensors (dropping vocabulary padding),
which go straight to their place in the output shards. Works for layer-stacked
(`...layers.<param>` with a layer axis) and per-layer (`...layers.<i>.<param>`) keys, and for
checkpoints with the local spec's older norm names (`stored.stored_key`). The config, tokenizer,
processor, chat template and remote code come from `hf_meta/`, stored there by `hf2mcore`.
Before anything is read, the files are checked against `convert_manifest.json` and the config
against the tensors' shapes (`verify.py`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..dtypes import HF_NAMES, from_hf_name, torch_dtype
from ..hf_config import hf_dtype_name
from ..utils.atomic import atomic_output_dir, check_output_not_input
from .common import EXTRA_STATE, HF_META, checkpoint_model_config, copy_hf_meta, single_process_group
from .mapping import ParamMapping, param_mappings, split_layer
from .run_folder import resolve_checkpoint_dir
from .safetensors_io import CheckpointError, ShardedSafetensorsWriter, TensorSpec, preview
from .stored import StoredTensor, locate
from .verify import check_config, check_files


# The export's steps, shared with the training ranks' `hf_export.export_hf` (checkpoint.save_hf).

def load_unit(name: str) -> str:
    """Load unit: all parameters of one transformer layer together, anything else alone."""
    layer = split_layer(name)
    return name if layer is None else layer.layer


def load_units(table: list[ParamMapping]) -> dict[str, list[ParamMapping]]:
    units: dict[str, list[ParamMapping]] = defaultdict(list)
    for m in table:
        units[load_unit(m.megatron)].append(m)
    return units


def default_dtype(hf_cfg: dict) -> str:
    """The output dtype when none is asked for: the original config's."""
    return from_hf_name(hf_dtype_name(hf_cfg))


def plan_hf_tensors(table: list[ParamMapping], shapes: dict[str, tuple[int, ...]],
                    out_dtype: torch.dtype) -> list[TensorSpec]:
    """Every HF tensor of the export, from the TP-free Megatron shape of each table entry."""
    specs = []
    for m in table:
        metas = m.transform.unmerge(torch.empty(shapes[m.megatron], device="meta"))
        specs += [TensorSpec(h, tuple(t.shape), out_dtype) for h, t in zip(m.hf, metas)]
    return specs


def write_unit(members: list[ParamMapping], tensors: dict[str, torch.Tensor], writer: ShardedSafetensorsWriter,
               out_dtype: torch.dtype, on_write=None) -> None:
    """The HF tensors of one load unit (TP-free Megatron tensors by table name) into the output."""
    for m in members:
        for h, t in zip(m.hf, m.transform.unmerge(tensors[m.megatron])):
            writer.write(h, t.to(out_dtype))
            if on_write:
                on_write(t.numel() * out_dtype.itemsize)


def mcore_to_hf(mcore_dir: str | Path, out: str | Path, dtype: str | None = None, overwrite: bool = False,
                max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> Path:
    from megatron.core import dist_checkpointing

    check_output_not_input(out, [mcore_dir])
    # A checkpoint folder, or a training run folder (its latest iteration, as `checkpoint.pretrained`).
    mcore_dir = resolve_checkpoint_dir(mcore_dir)
    meta_dir = mcore_dir / HF_META
    hf_cfg, cfg = checkpoint_model_config(mcore_dir)
    dtype = dtype or default_dtype(hf_cfg)
    out_dtype = torch_dtype(dtype)
    check_files(mcore_dir)
    with single_process_group():
        metadata = dist_checkpointing.load_tensors_metadata(str(mcore_dir))
        check_config(hf_cfg, cfg, metadata, meta_dir / "config.json")
        table = param_mappings(cfg, 1)
        stored = {m.megatron: locate(m.megatron, metadata) for m in table}
        _check_leftovers(metadata, stored)
        specs = plan_hf_tensors(table, {m.megatron: stored[m.megatron].shape for m in table}, out_dtype)
        groups = load_units(table)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes)
            bar = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="mcore2hf", disable=not progress)
            for members in groups.values():
                request = {m.megatron: stored[m.megatron].sharded_tensor() for m in members}
                # A subset of the checkpoint: no full-coverage check.
                loaded = dist_checkpointing.load(request, str(mcore_dir), validate_access_integrity=False)
                write_unit(members, {m.megatron: stored[m.megatron].unwrap(loaded.pop(m.megatron)) for m in members},
                           writer, out_dtype, bar.update)
                del loaded
            bar.close()
            writer.close()
            copy_meta(meta_dir, tmp, dtype)
    return Path(out)


def _check_leftovers(metadata: dict, stored: dict[str, StoredTensor]) -> None:
    used = {s.key for s in stored.values()}
    # A training checkpoint also holds the optimizer's state (`optimizer.*`), which has no HF form.
    leftover = sorted(k for k in metadata if k not in used and not k.endswith(EXTRA_STATE)
                      and not k.startswith("optimizer."))
    if leftover:
        raise CheckpointError(f"{len(leftover)} checkpoint tensors have no HF mapping: {preview(leftover)}")


def copy_meta(meta_dir: Path, dest: Path, dtype: str) -> None:
    """The non-weight files (config with the output dtype, tokenizer, processor, remote code)."""
    copy_hf_meta(meta_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["dtype"] = HF_NAMES[dtype]
    cfg.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
