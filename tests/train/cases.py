"""Per-rank bodies of the CPU training tests (module-level so spawned ranks can import them).
Each runs several cases in one process group, to keep the suite within its time budget."""

from __future__ import annotations

import contextlib
import io
import json
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from qwen_merge_mcore.checkpoint.safetensors_io import CheckpointError
from qwen_merge_mcore.training import checkpointing
from qwen_merge_mcore.training.checkpointing import latest_iteration
from qwen_merge_mcore.training.errors import NonFiniteError
from qwen_merge_mcore.training.loop import run_training

from qwen_merge_mcore.models.qwen_merge import build_model, freeze
from qwen_merge_mcore.training.model_provider import ModelBuilder

from .helpers import synthetic as _data, tiny_config as toy_config


BUILDER = ModelBuilder(build_model, freeze)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*iter_*"))


def resume_and_checkpoint_cases(root: str, tp: int) -> dict:
    """Uninterrupted run vs. a run stopped by SIGUSR1 and resumed; keep_last; a save that dies
    never becomes the latest."""
    root = Path(root)
    ckpt = {"save_interval": 3, "keep_last": 2}
    full = run_training(toy_config(tp=tp, checkpoint={"save": str(root / "full"), **ckpt},
                                   train={"train_iters": 7}), BUILDER, _data)
    kept = _names(root / "full")
    written = sum(f.stat().st_size for f in (root / "full" / "iter_0000007").rglob("*") if f.is_file())
    part = toy_config(tp=tp, checkpoint={"save": str(root / "part"), **ckpt}, train={"train_iters": 7})
    micro = part.train.global_batch_samples // part.train.micro_batch_size // dist.get_world_size() * tp
    stopped = run_training(part, BUILDER, partial(_data, signal_after=4 * micro))
    # As a run started from a converted checkpoint does, the checkpoints carry an hf_meta/. The
    # resumed run saves more often than keep_last: the checkpoint it resumed from is pruned
    # before its last save, which must still find an hf_meta to copy.
    if dist.get_rank() == 0:
        meta = checkpointing.iter_dir(root / "part", latest_iteration(root / "part")) / checkpointing.HF_META
        meta.mkdir()
        (meta / "config.json").write_text("{}")
    dist.barrier()
    resumed = run_training(toy_config(tp=tp, checkpoint={"save": str(root / "part"), "save_interval": 1,
                                                         "keep_last": 2}, train={"train_iters": 7}), BUILDER, _data)
    with_meta = sorted(p.parent.parent.name for p in (root / "part").glob(f"iter_*/{checkpointing.HF_META}/config.json"))

    real = checkpointing.save_dist_checkpoint

    def dying_save(state, directory, **kw):  # the process "dies" half way through writing
        Path(directory, f"__{dist.get_rank()}_0.distcp").write_bytes(b"partial")
        raise RuntimeError("killed mid-save")

    checkpointing.save_dist_checkpoint = dying_save
    failed = None
    try:
        run_training(toy_config(tp=tp, checkpoint={"save": str(root / "part"), "save_interval": 1},
                                train={"train_iters": 9}), BUILDER, _data)
    except RuntimeError as err:
        failed = str(err)
    finally:
        checkpointing.save_dist_checkpoint = real
    dist.barrier()
    after_failure = (latest_iteration(root / "part"), _names(root / "part"))
    return {"full": full.losses, "stopped": stopped.losses, "interrupted": stopped.interrupted,
            "resumed": resumed.losses, "resumed_from": resumed.first_iteration, "kept": kept, "with_meta": with_meta,
            "written": written,
            "failed": failed, "after_failure": after_failure}


def _tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def freeze_cases(root: str) -> dict:
    """Stage-1 freezing (vision + language frozen): only the projector changes; then a stage-3
    style run from that checkpoint (weights only) trains projector and language."""
    from megatron.core import dist_checkpointing

    out = {}
    captured = {}

    def builder_capture(cfg, **kw):
        model = BUILDER.build(cfg, **kw)
        captured["init"] = captured["before"] = _tensors(model)
        captured["model"] = model

        def first_forward(module, args):  # after any weights-only load, before the first step
            captured.setdefault("first_forward", _tensors(module))

        model.register_forward_pre_hook(first_forward)
        return model

    spy = ModelBuilder(builder_capture, BUILDER.freeze)
    tp = dist.get_world_size()
    stage1 = toy_config(tp=tp, checkpoint={"save": f"{root}/s1", "save_interval": 100},
                        train={"train_iters": 3, "freeze": ["vision", "language"]})
    run_training(stage1, spy, _data)
    out["stage1"] = _changes(captured)
    stage3 = toy_config(tp=tp, checkpoint={"save": f"{root}/s3", "pretrained": f"{root}/s1", "save_interval": 100},
                        train={"train_iters": 3, "freeze": ["vision"]})
    captured.clear()
    run_training(stage3, spy, _data)
    loaded = captured["before"] = captured["first_forward"]
    out["stage3"] = _changes(captured)  # what stage 3's steps changed, from the loaded weights
    # The weights stage 3 starts its steps with are stage 1's checkpoint (read here by Megatron
    # directly), which differs from stage 3's own initialisation: ignoring checkpoint.pretrained
    # fails this.
    reference = BUILDER.build(stage3, pre_process=True, post_process=True)
    state = dist_checkpointing.load({"model": reference.sharded_state_dict()},
                                    str(checkpointing.resolve_checkpoint_dir(f"{root}/s1")))
    reference.load_state_dict(state["model"])
    stage1_ckpt = _tensors(reference)
    out["loaded_pretrained"] = sorted(stage1_ckpt) == sorted(loaded) and all(
        torch.equal(loaded[k], stage1_ckpt[k]) for k in stage1_ckpt)
    out["stage1_differs_from_init"] = any(not torch.equal(captured["init"][k], stage1_ckpt[k]) for k in stage1_ckpt)
    return out


def _changes(captured) -> dict[str, bool]:
    after = captured["model"].state_dict()
    parts = {}
    for k, before in captured["before"].items():
        part = k.split(".")[0]
        parts[part] = parts.get(part, False) or not torch.equal(before, after[k])
    return parts


def nan_cases(root: str) -> dict:
    """Non-finite losses skip the step (weights untouched) and abort past train.max_nan_steps."""
    out = {}
    cfg = toy_config(tp=dist.get_world_size(), train={"train_iters": 4, "max_nan_steps": 2})
    poison = {"steps": {2, 3}, "calls": 0, "per_step": cfg.train.global_batch_samples}

    def build(c, **kw):
        model = BUILDER.build(c, **kw)

        def hook(module, args, output):
            step = poison["calls"] // poison["per_step"] + 1
            poison["calls"] += 1
            return output * float("nan") if step in poison["steps"] else output

        model.register_forward_hook(hook)
        return model

    summary = run_training(cfg, ModelBuilder(build, BUILDER.freeze), _data)
    out["nan_steps"], out["losses"] = summary.nan_steps, summary.losses
    poison.update(steps={1, 2, 3}, calls=0)
    try:
        run_training(cfg, ModelBuilder(build, BUILDER.freeze), _data)
        out["aborted"] = None
    except NonFiniteError as err:
        out["aborted"] = str(err)
    # lr=inf: finite loss and gradients, non-finite weights after the first update; the config
    # refuses it at load (tests/test_config.py), this sets it past that check.
    inf = toy_config(tp=dist.get_world_size(), checkpoint={"save": f"{root}/inf", "save_interval": 1},
                     train={"train_iters": 2})
    inf.train.lr = float("inf")
    try:
        run_training(inf, BUILDER, _data)
        out["inf"] = None
    except NonFiniteError as err:
        out["inf"] = str(err)
    out["inf_saved"] = (latest_iteration(f"{root}/inf"), _names(Path(root, "inf")))
    return out


def averaging_case(tp: int) -> dict:
    """The step's loss is the mean over every assistant token of all micro-batches and DP ranks
    (not a mean of per-micro-batch means), and the gradients are those of that mean."""
    from megatron.core import parallel_state

    from qwen_merge_mcore.training.cpu_engine import CPUEngine
    from qwen_merge_mcore.training.loop import seed_everything
    from qwen_merge_mcore.training.loss import model_forward
    from qwen_merge_mcore.training.model_provider import build_chunks

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    cfg = toy_config(tp=tp, train={"global_batch_samples": 3 * dp, "lr": 1e-3, "clip_grad": 0.0})
    seed_everything(cfg.train.seed)
    engine = CPUEngine(cfg, build_chunks(cfg, BUILDER))
    source = _data(cfg, rank, dp)
    batches = [next(source) for _ in range(3)]
    model = engine.models[0]
    sums = torch.zeros(2, dtype=torch.float64)
    means = []
    for b in batches:  # reference: one graph over all micro-batches of this rank
        per_token = model_forward(model, b)
        sums += torch.stack([(per_token * b.loss_mask).sum(), b.loss_mask.sum()]).double().detach()
        means.append(float((per_token * b.loss_mask).sum() / b.loss_mask.sum()))
    totals = sums.clone()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    ref = sum((model_forward(model, b) * b.loss_mask).sum() for b in batches) / float(totals[1])
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for g in ref_grads.values():
        dist.all_reduce(g, group=parallel_state.get_data_parallel_group())
    result = engine.train_step(iter(batches), 3)
    grad_diff = max(float((p.grad - ref_grads[n]).abs().max()) for n, p in model.named_parameters()
                    if p.requires_grad and "layernorm" not in n)
    return {"loss": result.loss, "expected": float(totals[0] / totals[1]), "naive": sum(means) / len(means),
            "tokens": result.num_tokens, "expected_tokens": int(totals[1]), "grad_diff": grad_diff}


def all_cases(root: str, tp: int) -> dict:
    return {"resume": resume_and_checkpoint_cases(f"{root}/resume", tp), "freeze": freeze_cases(f"{root}/freeze"),
            "nan": nan_cases(f"{root}/nan"), "averaging": averaging_case(tp)}


def _truncate_one_shard(ckpt: Path) -> Path:
    """Cut a .distcp file to half its length, as a full disk or a cut-short copy leaves it."""
    shard = sorted(ckpt.glob("*.distcp"))[0]
    if dist.get_rank() == 0:
        os.truncate(shard, shard.stat().st_size // 2)
    dist.barrier()
    return shard


def damaged_checkpoint_cases(root: str, tp: int) -> dict:
    """A truncated .distcp in the latest checkpoint: the resume falls back to the newest intact
    one and says so; a weights-only start from it names the file."""
    root = Path(root)
    ckpt = {"save": str(root / "run"), "save_interval": 2, "keep_last": 3}
    run_training(toy_config(tp=tp, checkpoint=ckpt, train={"train_iters": 4}), BUILDER, _data)
    shard = _truncate_one_shard(root / "run" / "iter_0000004")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        resumed = run_training(toy_config(tp=tp, checkpoint=ckpt, train={"train_iters": 6}), BUILDER, _data)
    out = {"shard": str(shard), "log": log.getvalue(), "resumed_from": resumed.first_iteration,
           "after": (latest_iteration(root / "run"), _names(root / "run"))}
    try:
        run_training(toy_config(tp=tp, checkpoint={"pretrained": str(root / "run" / "iter_0000004.damaged")},
                                train={"train_iters": 1}), BUILDER, _data)
        out["pretrained"] = None
    except CheckpointError as err:
        out["pretrained"] = str(err)
    return out


def longer_run_cases(root: str, tp: int) -> dict:
    """A finished 4-step run resumed with train.train_iters=8: the LR schedule follows the new
    length (said in the log), and the summary holds all 8 losses."""
    from qwen_merge_mcore.training.optim import build_scheduler

    root = Path(root)
    ckpt = {"save": str(root / "run"), "save_interval": 2}
    short = run_training(toy_config(tp=tp, checkpoint=ckpt, train={"train_iters": 4}), BUILDER, _data)
    longer_cfg = toy_config(tp=tp, checkpoint=ckpt, train={"train_iters": 8},
                            logging={"summary_json": str(root / "summary.json")})
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        longer = run_training(longer_cfg, BUILDER, _data)
    reference = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), longer_cfg.train, 8)
    expected = []
    for _ in range(8):  # the LR each step of a fresh 8-step run trains at
        expected.append(f"{reference.optimizer.param_groups[0]['lr']:.3e}")
        reference.step(1)
    written = json.loads((root / "summary.json").read_text()) if dist.get_rank() == 0 else None
    return {"short": short.losses, "longer": longer.losses, "log": log.getvalue(), "expected_lr": expected,
            "summary_json": written}


def load_pretrained(path: str, model: dict) -> None:
    """A weights-only load on every rank (what `checkpoint.pretrained` and the converters do)."""
    from qwen_merge_mcore.training.model_provider import build_chunks

    cfg = toy_config(tp=dist.get_world_size(), model=model)
    checkpointing.load_weights(path, build_chunks(cfg, BUILDER), cfg.model)
