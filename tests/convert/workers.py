"""Functions run on spawned CPU ranks (importable, as spawn requires). Each call handles several
layouts in one process group by rebuilding Megatron's parallel state per layout, so the test
suite pays the process start-up once."""

from __future__ import annotations

from qwen_merge_mcore.checkpoint.hf2mcore import ConvertOptions as Job
from qwen_merge_mcore.config import ParallelConfig


def _layout(parallel: ParallelConfig) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                                 virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size)


def convert_jobs(jobs: list[Job]) -> list[dict]:
    """hf2mcore's per-rank work for each job (the output folders must exist)."""
    from qwen_merge_mcore.checkpoint.hf2mcore import convert_rank, read_model_config
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    results = []
    for job in jobs:
        _layout(job.parallel)
        cfg = read_model_config(SafetensorsFolder(job.hf), job.spec)
        results.append(convert_rank(job.hf, job.out, cfg, job.parallel, "bf16", False, False))
    return results


def load_resharded(jobs: list[Job]) -> list[list[str]]:
    """Load each job's checkpoint (`out`) with Megatron's dist_checkpointing at the job's layout into
    a real CPU model, and list every parameter that differs from the same model filled straight
    from the HF folder by the mapping table."""
    import torch
    from megatron.core import dist_checkpointing

    from qwen_merge_mcore.checkpoint.hf2mcore import experiment, model_state, read_model_config
    from qwen_merge_mcore.checkpoint.mapping import load_hf_weights
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder
    from qwen_merge_mcore.models.qwen_merge import build_model
    from megatron.core import parallel_state as ps

    out = []
    for job in jobs:
        _layout(job.parallel)
        cfg = read_model_config(SafetensorsFolder(job.hf), job.spec)
        exp = experiment(cfg, job.parallel, "bf16")
        vpp = job.vpp
        stages = [(ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                   ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v), v)
                  for v in (range(vpp) if vpp else [None])]
        loaded = [build_model(exp, *s) for s in stages]
        reference = [build_model(exp, *s) for s in stages]
        state = dist_checkpointing.load(model_state(loaded), job.out)
        for i, chunk in enumerate(loaded):
            chunk.load_state_dict(state["model" if len(loaded) == 1 else f"model{i}"], strict=True)
        for chunk in reference:
            load_hf_weights(chunk, job.hf, cfg)
        bad = []
        for a, b in zip(loaded, reference):
            pb = dict(b.named_parameters())
            bad += [n for n, p in a.named_parameters() if not torch.equal(p, pb[n])]
        out.append(bad)
    return out


def convert_then_reload(jobs: list[Job], reloads: list[Job]) -> tuple[list[dict], list[list[str]]]:
    import torch.distributed as dist

    written = convert_jobs(jobs)
    dist.barrier()
    return written, load_resharded(reloads)
