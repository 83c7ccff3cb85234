"""torch_dist checkpoints of a training run: model, optimizer, LR scheduler, RNG, data sampler.

Layout of a run folder (Megatron-LM's):

    <save>/iter_0000100/                       one Megatron-Core distributed checkpoint
    <save>/iter_0000100/hf/                    its Hugging Face folder (checkpoint.save_hf)
    <save>/latest_checkpointed_iteration.txt   the iteration to resume from

A save writes into `<save>/.tmp_iter_0000100/`, renames it to `iter_0000100/` once every rank
has finished, then replaces the `latest` file atomically: a save killed at any point leaves the
previous checkpoint as the latest. Only the newest `keep_last` iterations are kept.

A *resume* (same run, `<save>` has a latest checkpoint) restores everything; a *weights-only*
start (`checkpoint.pretrained`: the previous stage's run, a converted checkpoint, or a Hugging Face
folder read slice by slice through the mapping table) loads only the model. RNG and sampler
state are stored per rank and restored only when the parallel layout is unchanged (a torch_dist
model and optimizer reload at any layout).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
from multiprocessing.managers import SyncManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from ..checkpoint.common import (HF_META, copy_hf_meta, is_hf_folder, load_model, load_model_chunk, load_sharded,
                                 model_state)
from ..checkpoint.cpu_compat import save_dist_checkpoint
from ..checkpoint.hf_export import export_hf
from ..checkpoint.hf_source import load_hf_folder
from ..checkpoint.run_folder import LATEST, iter_dir, latest_iteration, resolve_checkpoint_dir, saved_iterations
from ..checkpoint.safetensors_io import CheckpointError
from ..checkpoint.verify import verify_sizes
from ..config import ConfigError, ModelConfig
from ..config.schema import PARTS
from ..dtypes import torch_dtype
from ..utils.atomic import atomic_write_text, os_error_message
from .errors import NonFiniteError
from .optim import SCHEDULE_KEYS

HF_DIR = "hf"  # checkpoint.save_hf's folder inside each checkpoint


@dataclass
class TrainState:
    iteration: int = 0  # global batches consumed: optimizer steps taken, skipped ones included
    nan_steps: int = 0  # steps skipped for a non-finite loss or gradient norm
    # Every step's loss from iteration 1 on, carried across resumes: the summary's whole curve.
    losses: list = field(default_factory=list)


def checkpoint_bytes(cfg) -> int:
    """About one checkpoint's size: every weight in `precision.params_dtype`, plus the optimizer's
    fp32 state of the trainable ones (Adam's m and v; the GPU engine's distributed optimizer
    also keeps fp32 master weights)."""
    from ..perf.memory import MEGATRON_BF16, TORCH_FP32_ADAMW, parameter_counts
    from .engine import select_engine

    counts = parameter_counts(cfg.model)
    trainable = sum(counts.part(p) for p in PARTS if p not in cfg.train.freeze)
    policy = MEGATRON_BF16 if select_engine(cfg) == "gpu" else TORCH_FP32_ADAMW
    return counts.total * torch_dtype(cfg.precision.params_dtype).itemsize + trainable * policy.optimizer_bytes


def check_save_target(cfg) -> None:
    """`checkpoint.save` is writable and has room for one more checkpoint, checked before the
    model is built: otherwise a run trains until its first save and then loses that work."""
    if not cfg.checkpoint.save:
        return
    root = Path(cfg.checkpoint.save)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=root)
        os.close(fd)
        os.remove(probe)
        free = shutil.disk_usage(root).free
    except OSError as err:
        raise ConfigError("checkpoint.save", f"cannot write there: {os_error_message(err)}") from None
    need = checkpoint_bytes(cfg)
    if free < need:
        raise ConfigError("checkpoint.save", f"{root} has {free / 2**20:,.1f} MiB free; one checkpoint of this "
                          f"model takes about {need / 2**20:,.1f} MiB")


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1}


def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank(key: str, data) -> ShardedObject:
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_data_parallel_rank())
    lay = _layout()
    return ShardedObject(key, data, (lay["pp"], lay["tp"], lay["dp"]), (pp, tp, dp), replica_id=0)


def _sharded_state(engine, data_state: Optional[dict], is_loading: bool, with_rank_state: bool = True) -> dict:
    state = model_state(engine.unwrapped())
    model_flat = {}
    for v in state.values():
        model_flat.update(v)
    state["optimizer"] = engine.optimizer_sharded_state_dict(model_flat, is_loading=is_loading)
    if with_rank_state:
        state["rng"] = _per_rank("rng_state", _rng_state())
        state["data"] = _per_rank("data_state", data_state)
    return state


def check_pretrained(cfg) -> None:
    """`checkpoint.pretrained` names a checkpoint, a run folder or an HF folder, checked at start
    (unless the run resumes from its own checkpoints, which it then ignores)."""
    source, save = cfg.checkpoint.pretrained, cfg.checkpoint.save
    if not source or (save and latest_iteration(save) is not None) or is_hf_folder(source):
        return
    try:
        resolve_checkpoint_dir(source)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("checkpoint.pretrained", str(err)) from None


def find_hf_meta(pretrained: Optional[str], save: Optional[str]) -> Optional[Path]:
    """The `hf_meta/` folder this run's checkpoints carry on: its own latest checkpoint's, else
    the one of the checkpoint it starts from (a converted checkpoint or a previous stage)."""
    for root in (save, pretrained):
        if not root:
            continue
        if is_hf_folder(root):
            return Path(root)  # its non-weight files are the hf_meta
        try:
            meta = resolve_checkpoint_dir(root) / HF_META
        except FileNotFoundError:
            continue
        if meta.is_dir():
            return meta
    return None


def _ignore_exit_signals() -> None:
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


_MANAGERS: list[SyncManager] = []


def signal_proof_write_queue() -> None:
    """Megatron's torch_dist writer returns its write results through a queue served by a
    multiprocessing Manager process that it starts on first use and keeps
    (`filesystem_async._results_queue`). Slurm sends SIGTERM to every process of a job step,
    which kills that server, and the checkpoint the signal asks for then fails with a broken
    pipe. Start the server here, ignoring the exit signals (the trainer handles them), before the
    first save; it shuts down with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=_ignore_exit_signals)
        _MANAGERS.append(manager)
        filesystem_async._results_queue = manager.Queue()


class Checkpointer:
    def __init__(self, save: Optional[str], keep_last: int, async_save: bool = False,
                 hf_meta: Optional[Path] = None, save_hf: Optional[ModelConfig] = None):
        self.root = Path(save) if save else None
        if self.root is not None:
            signal_proof_write_queue()
        self.keep_last = keep_last
        # Copied into every checkpoint, so that `qmm mcore2hf` exports any of them.
        self.hf_meta = hf_meta
        # The model whose HF folder every save also writes (checkpoint.save_hf), or None.
        self.save_hf = save_hf
        if save_hf is not None and hf_meta is None:
            raise ValueError("checkpoint.save_hf needs the Hugging Face files (config, tokenizer) of the model: set "
                             "checkpoint.pretrained to an HF folder, a `qmm hf2mcore` checkpoint or a run started "
                             "from one")
        self.async_queue = None
        if async_save and torch.cuda.is_available():
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    # --- saving -------------------------------------------------------------------------
    def save(self, iteration: int, engine, scheduler, data_state: dict, train_state: TrainState,
             extra: Optional[dict] = None) -> Optional[Path]:
        if self.root is None:
            return None
        final, tmp = iter_dir(self.root, iteration), self.root / f".tmp_iter_{iteration:07d}"
        if final.exists():  # this iteration is already saved (a signal right after an interval save)
            return final
        self.wait()  # one save in flight at a time
        engine.sync_params()  # the weights of this step on every rank (distributed optimizer)
        self._check_finite(engine, iteration)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = _sharded_state(engine, data_state, is_loading=False)
        # Rank 0's data state once more in the common state: the sample position, the same on every
        # rank, lets a run resumed at another layout continue with the next unseen sample.
        state.update(scheduler=scheduler.state_dict(), train_state=asdict(train_state), layout=_layout(),
                     data_position=data_state, **(extra or {}))
        request = save_dist_checkpoint(state, str(tmp), async_sharded_save=self.async_queue is not None)
        if self.save_hf is not None:  # inside the checkpoint's temp folder: published with it
            export_hf(engine.unwrapped(), tmp / HF_DIR, self.hf_meta, self.save_hf)
        finalize = lambda: self._publish(tmp, final, iteration)  # noqa: E731
        if self.async_queue is not None:
            request.add_finalize_fn(finalize)
            self.async_queue.schedule_async_request(request)
        else:
            dist.barrier()
            finalize()
            dist.barrier()
        return final

    def _check_finite(self, engine, iteration: int) -> None:
        """Refuse to save non-finite weights (every rank raises together), so that the latest
        checkpoint is always one a run can continue from."""
        bad = next((name for model in engine.unwrapped() for name, p in model.named_parameters()
                    if not torch.isfinite(p).all()), None)
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
        rank = next((r for r, name in enumerate(found) if name is not None), None)
        if rank is not None:
            latest = latest_iteration(self.root)
            kept = f"the latest stays {iter_dir(self.root, latest)}" if latest is not None else "none was saved"
            raise NonFiniteError(f"iteration {iteration}: the weights are not finite ({found[rank]} on rank {rank}), "
                                 f"so they were not saved and {kept}; lower train.lr or check the steps before")

    def _publish(self, tmp: Path, final: Path, iteration: int) -> None:
        """Rank 0, after every rank wrote its shards: rename, point `latest` at it, prune."""
        if dist.get_rank() != 0:
            return
        if self.hf_meta is not None:
            copy_hf_meta(self.hf_meta, tmp / HF_META)  # an hf_meta/ or an HF folder (no weights)
        tmp.rename(final)
        if self.hf_meta is not None:
            # The next save copies from this, the newest checkpoint, which keep_last never prunes
            # (the one this run started from may be pruned by then).
            self.hf_meta = final / HF_META
        atomic_write_text(self.root / LATEST, f"{iteration}\n")
        done = saved_iterations(self.root)
        for old in done[: max(len(done) - self.keep_last, 0)]:
            shutil.rmtree(iter_dir(self.root, old), ignore_errors=True)
        for stale in self.root.glob(".tmp_iter_*"):  # left by a save that was killed
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)

    def poll(self) -> None:
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    # --- loading ------------------------------------------------------------------------
    def resume(self, engine, scheduler, data_iter) -> Optional[TrainState]:
        """Restore the full state from this run's latest checkpoint; None when there is none."""
        if self.root is None:
            return None
        iteration = latest_iteration(self.root)
        if iteration is None:
            return None
        ckpt = iter_dir(self.root, self._intact(iteration))
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
        same_layout = common["layout"] == _layout()
        template = _sharded_state(engine, None, is_loading=True, with_rank_state=same_layout)
        loaded = load_sharded(template, ckpt)
        for i, model in enumerate(engine.unwrapped()):
            load_model_chunk(model, loaded["model" if len(engine.unwrapped()) == 1 else f"model{i}"])
        engine.load_optimizer_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        changed = [f"{k} {common['scheduler'][k]} -> {getattr(scheduler, k)}" for k in SCHEDULE_KEYS
                   if common["scheduler"].get(k) != getattr(scheduler, k)]
        if changed and dist.get_rank() == 0:
            print(f"[checkpoint] the LR schedule follows this config, not the checkpoint's: {', '.join(changed)} "
                  f"(at step {scheduler.num_steps})", flush=True)
        if same_layout:
            _set_rng_state(loaded["rng"])
            data_iter.load_state_dict(loaded["data"])
        else:
            if common.get("data_position") is not None:
                data_iter.load_state_dict(common["data_position"])
            if dist.get_rank() == 0:
                print(f"[checkpoint] layout changed {common['layout']} -> {_layout()}: model and optimizer "
                      "resharded, RNG afresh, data at the saved sample position", flush=True)
        return TrainState(**common["train_state"])

    def _intact(self, latest: int) -> int:
        """The newest checkpoint of this run, from `latest` down, whose files are all whole. Rank 0
        decides, moves damaged ones aside (kept for a look, out of the next saves' way) and
        points `latest` at the one chosen."""
        choice = [None]
        if dist.get_rank() == 0:
            damaged = []
            for it in reversed([it for it in saved_iterations(self.root) if it <= latest]):
                try:
                    verify_sizes(iter_dir(self.root, it))
                except CheckpointError as err:
                    damaged.append((it, str(err)))
                    continue
                choice[0] = it
                break
            if damaged and choice[0] is None:
                choice[0] = f"no intact checkpoint in {self.root}: {damaged[0][1]}"
            elif damaged:
                for it, why in damaged:
                    aside = iter_dir(self.root, it).with_suffix(".damaged")
                    iter_dir(self.root, it).rename(aside)
                    print(f"[checkpoint] {why}: moved aside to {aside.name}", flush=True)
                atomic_write_text(self.root / LATEST, f"{choice[0]}\n")
                print(f"[checkpoint] resuming from the newest intact checkpoint, {iter_dir(self.root, choice[0])}",
                      flush=True)
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise CheckpointError(choice[0])
        return choice[0]


def load_weights(path: str | Path, models: list[torch.nn.Module], model_cfg: ModelConfig) -> Path:
    """Weights-only start from a converted checkpoint or a previous stage's run (any layout), or
    from a Hugging Face folder (each rank reads its own slices, no conversion step)."""
    if is_hf_folder(path):
        load_hf_folder(models, path, model_cfg)
        return Path(path)
    ckpt = resolve_checkpoint_dir(path)
    load_model(models, ckpt)
    return ckpt
