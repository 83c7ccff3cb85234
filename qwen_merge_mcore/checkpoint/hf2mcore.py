"""Hugging Face folder -> Megatron-Core torch_dist checkpoint, one process per model-parallel rank.

Each rank builds its part of the model on the meta device (so the checkpoint's keys, global shapes
and offsets come from Megatron itself: layer-stacked decoder keys, the SwiGLU fc1 factory, tied
embeddings, te/local names), checks every HF tensor it needs against them, then writes through
`dcp_stream.save_streaming`, reading each tensor slice from safetensors when it is written.

The output folder holds the torch_dist files, `hf_meta/` (config, tokenizer, processor, chat
template: what `mcore2hf` copies back) and `convert_manifest.json` (every written tensor with
shape, dtype, CRC32 and its HF sources). It is built in a temp dir and renamed at the end.
"""

from __future__ import annotations

import json
import os
import resource
import time
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..config import ExperimentConfig, ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig
from ..config.schema import validate_layout
from ..hf_config import model_config_from_hf
from ..utils.atomic import atomic_output_dir, check_output_not_input
from .mapping import param_mappings
from .safetensors_io import INDEX, CheckpointError, SafetensorsFolder, preview

HF_META = "hf_meta"
MANIFEST = "convert_manifest.json"


@dataclass
class ConvertOptions:
    hf: str
    out: str
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    first_stage_layers: Optional[int] = None
    spec: str = "auto"  # layer names of the training backend: te, local, or auto (te where it imports)
    dtype: str = "bf16"
    overwrite: bool = False
    progress: bool = True
    sync_files: bool = True

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              virtual_pipeline_model_parallel_size=self.vpp,
                              first_stage_layers=self.first_stage_layers)


def read_model_config(folder: SafetensorsFolder, spec: str) -> ModelConfig:
    try:
        cfg = model_config_from_hf(folder.config())
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{folder.folder}/config.json: cannot read the model config ({err})") from None
    cfg.backend = spec
    return cfg


def check_layout(cfg: ModelConfig, parallel: ParallelConfig) -> None:
    parallel.validate()
    validate_layout(cfg, parallel)


def check_coverage(folder: SafetensorsFolder, cfg: ModelConfig) -> None:
    """Every HF tensor is consumed exactly once by the table, and the table finds all it needs."""
    wanted = [h for m in param_mappings(cfg) for h in m.hf]
    dupes = sorted({h for h in wanted if wanted.count(h) > 1})
    missing = sorted(set(wanted) - set(folder.names()))
    leftover = sorted(set(folder.names()) - set(wanted))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors the config requires are missing: {preview(missing)}")
    if leftover:
        problems.append(f"{len(leftover)} tensors would be left over (not in the {cfg.architecture} "
                        f"mapping): {preview(leftover)}")
    if dupes:
        problems.append(f"tensors mapped twice: {preview(dupes)}")
    if problems:
        raise CheckpointError(f"{folder.folder}: " + "; ".join(problems))


def experiment(cfg: ModelConfig, parallel: ParallelConfig, dtype: str) -> ExperimentConfig:
    return ExperimentConfig(model=cfg, parallel=parallel, precision=PrecisionConfig(params_dtype=dtype),
                            train=TrainConfig(train_iters=1, freeze=[]))


def meta_model_chunks(exp: ExperimentConfig) -> list:
    """This rank's model chunks (one per virtual pipeline stage) with no storage behind them."""
    import torch
    from megatron.core import parallel_state as ps

    from ..models.qwen_merge import build_model

    vpp = exp.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    with torch.device("meta"):
        for vp in (range(vpp) if vpp else [None]):
            chunks.append(build_model(exp, ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                                      ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp), vp))
    return chunks


def model_state(chunks: list) -> dict:
    """The sharded state dict as Megatron training saves it: `model`, or `model0..` per VP stage."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def convert_rank(hf_dir: str, out_dir: str, cfg: ModelConfig, parallel: ParallelConfig, dtype: str,
                 progress: bool = False, sync_files: bool = True) -> dict:
    """One rank's part of the conversion (inside an initialised process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import is_main_replica
    from tqdm import tqdm

    from .dcp_stream import save_streaming
    from .hf_source import HFTensorSource, sharded_tensors

    folder = SafetensorsFolder(hf_dir)
    state = model_state(meta_model_chunks(experiment(cfg, parallel, dtype)))
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
    save_streaming(state, out_dir, source.materialize, sync_files=sync_files)
    if bar is not None:
        bar.close()
    return {"problems": [], "written": [asdict(w) for w in source.written],
            "rank": {"rank": dist.get_rank(), "save_seconds": time.perf_counter() - start,
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}


def hf_to_mcore(opts: ConvertOptions) -> Path:
    """Convert, spawning one CPU/GPU process per model-parallel rank, or, under torchrun/srun
    (WORLD_SIZE set), as this process's rank."""
    from ..models.backend import resolve_backend

    check_output_not_input(opts.out, [opts.hf])
    folder = SafetensorsFolder(opts.hf)
    cfg = read_model_config(folder, resolve_backend(opts.spec))
    parallel = opts.parallel
    check_layout(cfg, parallel)
    check_coverage(folder, cfg)
    refuse_existing(Path(opts.out), opts.overwrite)
    args = (cfg, parallel, opts.dtype, opts.progress, opts.sync_files)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _as_launched_rank(opts, folder, cfg, args)
    with atomic_output_dir(opts.out, overwrite=opts.overwrite) as tmp:
        from ..testing.distributed import run_distributed

        results = run_distributed(convert_rank, world_size=opts.tp * opts.pp, tp=opts.tp, pp=opts.pp,
                                  vpp=opts.vpp, args=(str(folder.folder), str(tmp), *args), timeout=24 * 3600)
        _finish(tmp, results, folder, cfg, opts)
    return Path(opts.out)


def _as_launched_rank(opts: ConvertOptions, folder: SafetensorsFolder, cfg: ModelConfig, args: tuple) -> Path:
    import contextlib

    import torch.distributed as dist

    from .. import distributed

    distributed.initialize(opts.parallel)
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
    manifest = {"source": str(Path(opts.hf).absolute()), "format": "torch_dist",
                "architecture": cfg.architecture, "spec": cfg.backend, "dtype": opts.dtype,
                "parallel": {"tp": opts.tp, "pp": opts.pp, "vpp": opts.vpp,
                             "first_stage_layers": opts.first_stage_layers},
                "ranks": [r["rank"] for r in results],
                "tensors": sorted((w for r in results for w in r["written"]), key=lambda w: (w["key"], w["offset"]))}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def copy_hf_meta(hf_dir: Path, dest: Path) -> None:
    """Everything but the weights: config, tokenizer, chat template, processor, remote code."""
    dest.mkdir(parents=True)
    for path in sorted(hf_dir.iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX:
            shutil.copy2(path, dest / path.name)

