"""Hugging Face folder -> Megatron-Core torch_dist checkpoint, one process per model-parallel rank.

Each rank builds its part of the model on the meta device (so the checkpoint's keys, global shapes
and offsets come from Megatron itself: layer-stacked decoder keys, the SwiGLU fc1 factory, tied
embeddings; the te spec's names, which the local spec it is built with writes too), checks every
HF tensor it needs against them, then writes through `dcp_stream.save_streaming`, reading each
tensor slice from safetensors (`hf_source.HFTensorSource`) when it is written.

The output folder holds the torch_dist files, `hf_meta/` (config, tokenizer, processor, chat
template: what `mcore2hf` copies back) and `convert_manifest.json` (every written tensor with
shape, dtype and its HF sources; every file with its size and CRC32, which `mcore2hf` and the
loaders verify). It is built in a temp dir and renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import is_main_replica
from tqdm import tqdm

from .. import distributed
from ..config import ModelConfig, ParallelConfig
from ..config.schema import validate_layout
from ..utils.atomic import atomic_output_dir, check_output_not_input
from .common import HF_META, converter_experiment, copy_hf_meta, model_chunks, model_state, read_model_config
# Imported here, not in the ranks: forked ranks inherit them (each would import Megatron's and
# torch's checkpointing again, a second of a small conversion).
from .dcp_stream import save_streaming
from .hf_source import HFTensorSource, check_coverage, sharded_tensors
from .safetensors_io import CheckpointError, SafetensorsFolder, preview
from .verify import MANIFEST, file_crc32
# The ranks meet in a collective after writing their shards, so one rank may wait there for the
# slowest one's whole write: a 72B model (145 GB in bf16) written by one rank at 50 MB/s (a busy
# shared file system) takes 50 minutes; collectives of training runs default to 30.
TIMEOUT_MINUTES = 240


@dataclass
class ConvertOptions:
    hf: str
    out: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    dtype: str = "bf16"
    overwrite: bool = False
    progress: bool = True
    sync_files: bool = True
    timeout_minutes: int = TIMEOUT_MINUTES  # one collective's limit (see TIMEOUT_MINUTES)

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              virtual_pipeline_model_parallel_size=self.vpp,
                              first_stage_layers=self.first_stage_layers)


def converter_model_config(folder: SafetensorsFolder) -> ModelConfig:
    """The HF folder's model, built with the local spec: it runs anywhere (also on the meta
    device) and writes the same torch_dist keys as the te spec."""
    cfg = read_model_config(folder.folder / "config.json")[1]
    cfg.backend = "local"
    return cfg


def check_layout(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    parallel.validate()
    validate_layout(cfg, parallel)


def convert_rank(hf_dir: str, out_dir: str, cfg: ModelConfig, parallel: ParallelConfig, dtype: str,
                 progress: bool = False, sync_files: bool = True) -> dict:
    """One rank's part of the conversion (inside an initialised process group)."""
    folder = SafetensorsFolder(hf_dir)
    with torch.device("meta"):
        state = model_state(model_chunks(converter_experiment(cfg, parallel, dtype)))
    source = HFTensorSource(folder, cfg, ps.get_tensor_model_parallel_world_size())
    problems, used = source.check(state)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (problems, sorted(used)))
    problems = sorted({p for rank_problems, _ in gathered for p in rank_problems})
    unused = sorted(set(folder.names()) - {h for _, u in gathered for h in u})
    if unused:
        problems.append(f"{len(unused)} HF tensors no rank consumes: {preview(unused)}")
    if problems:
        return {"problems": problems}
    bar = None
    if dist.get_rank() == 0 and progress:
        total = sum(t.data.numel() * t.data.element_size() for t in sharded_tensors(state)
                    if is_main_replica(t.replica_id))
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"hf2mcore (rank 0 of {dist.get_world_size()})")
        source.on_write = bar.update
    start = time.perf_counter()
    files = save_streaming(state, out_dir, source.materialize, sync_files=sync_files)
    if bar is not None:
        bar.close()
    return {"problems": [], "written": [asdict(w) for w in source.written], "files": files,
            "rank": {"rank": dist.get_rank(), "save_seconds": time.perf_counter() - start,
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}


def hf_to_mcore(opts: ConvertOptions) -> Path:
    """Convert, spawning one CPU/GPU process per model-parallel rank, or, under torchrun/srun
    (WORLD_SIZE set), as this process's rank."""
    check_output_not_input(opts.out, [opts.hf])
    folder = SafetensorsFolder(opts.hf)
    cfg = converter_model_config(folder)
    parallel = opts.parallel
    check_layout(cfg, parallel)
    check_coverage(folder, cfg)
    refuse_existing(Path(opts.out), opts.overwrite)
    args = (cfg, parallel, opts.dtype, opts.progress, opts.sync_files)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _as_launched_rank(opts, folder, cfg, args)
    with atomic_output_dir(opts.out, overwrite=opts.overwrite) as tmp:
        results = distributed.run_distributed(convert_rank, world_size=opts.tp * opts.pp, tp=opts.tp, pp=opts.pp,
                                  vpp=opts.vpp, args=(str(folder.folder), str(tmp), *args), timeout=24 * 3600,
                                  collective_timeout_minutes=opts.timeout_minutes)
        _finish(tmp, results, folder, cfg, opts)
    return Path(opts.out)


def _as_launched_rank(opts: ConvertOptions, folder: SafetensorsFolder, cfg: ModelConfig, args: tuple) -> Path:
    distributed.initialize(opts.parallel, timeout_minutes=opts.timeout_minutes)
    try:
        rank0 = dist.get_rank() == 0
        with (atomic_output_dir(opts.out, overwrite=opts.overwrite) if rank0 else contextlib.nullcontext()) as tmp:
            box = [str(tmp) if rank0 else None]
            dist.broadcast_object_list(box, src=0)
            result = convert_rank(str(folder.folder), box[0], *args)
            results: list = [None] * dist.get_world_size()
            dist.all_gather_object(results, result)
            if rank0:
                _finish(tmp, results, folder, cfg, opts)
            elif any(r["problems"] for r in results):
                raise CheckpointError("conversion refused (see rank 0)")
            dist.barrier()
    finally:
        distributed.destroy()
    return Path(opts.out)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Checked up front, on every rank, so that no rank waits for one that refused."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it")


def _finish(tmp: Path, results: list[dict], folder: SafetensorsFolder, cfg: ModelConfig,
            opts: ConvertOptions) -> None:
    problems = sorted({p for r in results for p in r["problems"]})
    if problems:
        raise CheckpointError(f"{opts.hf}: cannot convert: " + "; ".join(problems[:10]))
    copy_hf_meta(folder.folder, tmp / HF_META)
    files = {name: f for r in results for name, f in r["files"].items()}
    # The shards' checksums came with the writes; the few small files (metadata, common.pt) are read.
    for path in sorted(tmp.iterdir()):
        if path.is_file() and path.name not in files:
            size, crc = file_crc32(path)
            files[path.name] = {"bytes": size, "crc32": crc}
    manifest = {"source": str(Path(opts.hf).absolute()), "format": "torch_dist",
                "architecture": cfg.architecture, "dtype": opts.dtype,
                "parallel": {"tp": opts.tp, "pp": opts.pp, "vpp": opts.vpp,
                             "first_stage_layers": opts.first_stage_layers},
                "ranks": [r["rank"] for r in results], "files": dict(sorted(files.items())),
                "tensors": sorted((w for r in results for w in r["written"]), key=lambda w: (w["key"], w["offset"]))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
