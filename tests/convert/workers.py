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


def _chunks(job: Job) -> tuple[list, object]:
    """This rank's model chunks at the job's layout (real CPU tensors, bf16) and the model config."""
    from qwen_merge_mcore.checkpoint.common import converter_experiment, model_chunks
    from qwen_merge_mcore.checkpoint.hf2mcore import converter_model_config
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    cfg = converter_model_config(SafetensorsFolder(job.hf))
    return model_chunks(converter_experiment(cfg, job.parallel, "bf16")), cfg


def convert_jobs(jobs: list[Job]) -> list[dict]:
    """hf2mcore's per-rank work for each job (the output folders must exist)."""
    from qwen_merge_mcore.checkpoint.hf2mcore import convert_rank, converter_model_config
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    results = []
    for job in jobs:
        _layout(job.parallel)
        cfg = converter_model_config(SafetensorsFolder(job.hf))
        results.append(convert_rank(job.hf, job.out, cfg, job.parallel, "bf16", False, False))
    return results


def write_legacy(job: Job) -> None:
    """A checkpoint as the local spec wrote it before it declared the te names: the model filled
    from the HF folder, saved by Megatron with the local norm names `input_layernorm.weight` and
    `pre_mlp_layernorm.weight`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from qwen_merge_mcore.checkpoint.common import model_state
    from qwen_merge_mcore.checkpoint.cpu_compat import save_dist_checkpoint
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.models.specs import LOCAL_TO_TE_KEYS

    _layout(job.parallel)
    chunks, cfg = _chunks(job)
    for chunk in chunks:
        load_hf_weights(chunk, job.hf, cfg)
    state = model_state(chunks)
    for item in nested_values(state):
        if isinstance(item, ShardedBase):
            for local, te in LOCAL_TO_TE_KEYS.items():
                item.key = item.key.replace(f".{te}", f".{local}")
    save_dist_checkpoint(state, job.out)


def load_resharded(jobs: list[Job]) -> list[list[str]]:
    """Load each job's checkpoint (`out`) at the job's layout into a real CPU model, and list
    every parameter that differs from the same model filled straight from the HF folder by the
    mapping table."""
    import torch

    from qwen_merge_mcore.checkpoint.common import load_model
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights

    out = []
    for job in jobs:
        _layout(job.parallel)
        loaded, cfg = _chunks(job)
        reference, _ = _chunks(job)
        load_model(loaded, job.out)
        for chunk in reference:
            load_hf_weights(chunk, job.hf, cfg)
        bad = []
        for a, b in zip(loaded, reference):
            pb = dict(b.named_parameters())
            bad += [n for n, p in a.named_parameters() if not torch.equal(p, pb[n])]
        out.append(bad)
    return out


def convert_then_reload(jobs: list[Job], legacy: list[Job], reloads: list[Job]) -> tuple[list[dict], list[list[str]]]:
    import torch.distributed as dist

    written = convert_jobs(jobs)
    for job in legacy:
        write_legacy(job)
    dist.barrier()
    return written, load_resharded(reloads)


def load_errors(jobs: list[Job]) -> list[str]:
    """What loading each job's `out` into a model at its layout raises, as the trainer loads a
    pretrained checkpoint ('' when it loads)."""
    from qwen_merge_mcore.checkpoint.common import load_model
    from qwen_merge_mcore.checkpoint.safetensors_io import CheckpointError

    errors = []
    for job in jobs:
        _layout(job.parallel)
        chunks, _ = _chunks(job)
        try:
            load_model(chunks, job.out)
            errors.append("")
        except CheckpointError as err:
            errors.append(str(err))
    return errors
