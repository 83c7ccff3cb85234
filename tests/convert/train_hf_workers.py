"""Per-rank body of tests/convert/test_train_hf.py (module-level, as spawn requires): training
stages started from an HF folder and from its `qmm hf2mcore` conversion, at TP 2 and TP 1 in one
2-rank process group (parallel state rebuilt per layout), saving HF folders as they go."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from qwen_merge_mcore.config import ParallelConfig

from ..train.helpers import synthetic, tiny_config


def _layout(tp: int, pp: int = 1, vpp: int | None = None) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _convert(hf: str, out: Path) -> None:
    """`qmm hf2mcore --tp 2` (its per-rank part, then the parent's)."""
    from qwen_merge_mcore.checkpoint.common import HF_META, copy_hf_meta
    from qwen_merge_mcore.checkpoint.hf2mcore import convert_rank, converter_model_config
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    _layout(2)
    if dist.get_rank() == 0:
        out.mkdir()
    dist.barrier()
    result = convert_rank(hf, str(out), converter_model_config(SafetensorsFolder(hf)), ParallelConfig(2), "bf16",
                          sync_files=False)
    assert not result["problems"], result["problems"]
    dist.barrier()
    if dist.get_rank() == 0:
        copy_hf_meta(hf, out / HF_META)
    dist.barrier()


def _first_loss(tp: int, save: Path, pretrained: str | None, save_hf: bool = False, iters: int = 1) -> float | None:
    """The first step's loss (on rank 0; None elsewhere)."""
    from qwen_merge_mcore.training.loop import run_training

    _layout(tp)
    ckpt = {"save": str(save), "pretrained": pretrained, "save_hf": save_hf}
    cfg = tiny_config(tp=tp, checkpoint=ckpt, train={"train_iters": iters})
    losses = run_training(cfg, make_data=synthetic).losses
    return losses[0] if losses else None


def _error(fn, *args) -> str | None:
    try:
        fn(*args)
    except Exception as err:  # what the CLI prints: the message alone
        return f"{type(err).__name__}: {err}"
    return None


def export_pipelined(hf: str, out: Path, pp: int, vpp: int | None) -> None:
    """`export_hf` from chunks filled from `hf` at a pipelined layout: several stages (and virtual
    stages) write into the same output."""
    from qwen_merge_mcore.checkpoint.common import converter_experiment, model_chunks
    from qwen_merge_mcore.checkpoint.hf2mcore import converter_model_config
    from qwen_merge_mcore.checkpoint.hf_export import export_hf
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_folder
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    _layout(1, pp, vpp)
    cfg = converter_model_config(SafetensorsFolder(hf))
    chunks = model_chunks(converter_experiment(cfg, ParallelConfig(pipeline_model_parallel_size=pp,
                                                                   virtual_pipeline_model_parallel_size=vpp), "bf16"))
    load_hf_folder(chunks, hf, cfg)
    export_hf(chunks, out, hf, cfg)


def train_from_hf(hf: str, qwen3: str, root: str) -> dict:
    root = Path(root)
    converted = root / "converted"
    _convert(hf, converted)
    out = {}
    for tp in (2, 1):
        out[tp] = {"hf": _first_loss(tp, root / f"from-hf-tp{tp}", hf, save_hf=True),
                   "mcore": _first_loss(tp, root / f"from-mcore-tp{tp}", str(converted))}
    out["scratch"] = _first_loss(1, root / "scratch", None)
    out["wrong_model"] = _error(_first_loss, 1, root / "wrong", qwen3)
    out["missing"] = _error(_first_loss, 1, root / "missing", str(root / "no-such-folder"))
    out["save_hf_without_meta"] = _error(_first_loss, 1, root / "no-meta", None, True)
    for vpp in (None, 2):
        export_pipelined(hf, root / f"export-pp2-vpp{vpp}", 2, vpp)
    return out
