"""Single-process pieces of the training system: LR schedule, micro-batch arithmetic, checkpoint
markers, freeze checks, the sbatch scripts' shell syntax."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from qwen_merge_mcore.config import ConfigError, TrainConfig
from qwen_merge_mcore.training import checkpointing
from qwen_merge_mcore.training.model_provider import check_freeze
from qwen_merge_mcore.training.optim import build_scheduler, param_groups

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]


def test_lr_warmup_then_cosine():
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(param_groups(layer, 0.1), lr=1.0)
    train = TrainConfig(lr=1e-3, min_lr=1e-5, lr_warmup_fraction=0.1, train_iters=100, weight_decay=0.1)
    sched = build_scheduler(opt, train, 100)
    lrs = []
    for _ in range(101):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(1)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    # Cosine from max_lr at the end of warmup down to min_lr at the last step.
    assert lrs[55] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(1e-5)
    # Weight decay only on matrices, none on biases.
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_batch_in_samples_is_checked_for_the_world_size():
    cfg = tiny_config(tp=2, train={"global_batch_samples": 8})
    assert cfg.data_parallel_size(2) == 1 and cfg.data_parallel_size(6) == 3  # any DP that gets a sample
    assert cfg.data_parallel_size(16) == 8
    with pytest.raises(ConfigError, match="8 samples per step cannot give each of the 9 data-parallel ranks"):
        cfg.data_parallel_size(18)
    with pytest.raises(ConfigError, match="world size 3 is not a multiple of TP x PP x CP = 2"):
        cfg.data_parallel_size(3)


def test_old_batch_key_is_refused_with_the_new_name():
    from qwen_merge_mcore.config import load_config

    with pytest.raises(ConfigError, match="train.global_batch_size.*set train.global_batch_samples"):
        load_config(REPO / "launch" / "tiny" / "stage1.yaml", ["train.global_batch_size=16"])


def test_latest_marker(tmp_path):
    assert checkpointing.latest_iteration(tmp_path) is None
    (tmp_path / checkpointing.LATEST).write_text("12\n")
    with pytest.raises(FileNotFoundError, match="names iteration 12"):
        checkpointing.latest_iteration(tmp_path)
    (tmp_path / "iter_0000012").mkdir()
    assert checkpointing.latest_iteration(tmp_path) == 12
    assert checkpointing.resolve_checkpoint_dir(tmp_path) == tmp_path / "iter_0000012"
    with pytest.raises(FileNotFoundError, match="neither a torch_dist checkpoint"):
        checkpointing.resolve_checkpoint_dir(tmp_path / "iter_0000012")


def test_freeze_check_refuses_a_silent_no_op():
    report = {"vision": {"trainable": 10, "frozen": 0}, "projector": {"trainable": 5, "frozen": 0},
              "language": {"trainable": 0, "frozen": 7}}
    with pytest.raises(RuntimeError, match="part 'vision' should be frozen but has 10 trainable"):
        check_freeze(report, ["vision", "language"])
    report["vision"] = {"trainable": 0, "frozen": 10}
    check_freeze(report, ["vision", "language"])


def test_sbatch_scripts_parse():
    scripts = sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh"]
    assert {p.name for p in scripts} >= {"stage1.sbatch", "stage2.1.sbatch", "stage2.2.sbatch", "stage3.sbatch",
                                         "convert.sbatch", "export.sbatch"}
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
    for stage in ("stage1", "stage2.1", "stage2.2", "stage3"):
        text = (REPO / "slurm" / f"{stage}.sbatch").read_text()
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text


# The stage table of docs/training.md: (frozen parts, lr, template).
STAGES = {"stage1": (["vision", "language"], 5e-4, "pretrain"), "stage2.1": (["vision"], 5e-5, "pretrain"),
          "stage2.2": (["vision"], 5e-5, "pretrain"), "stage3": (["vision"], 5e-5, "qwen3")}
SIZES = {
    "4b": ["model.preset=qwen-merge-72bvit-4b", "parallel.tensor_model_parallel_size=2"],
    "8b": [],
    "32b": ["model.preset=qwen-merge-72bvit-32b", "parallel.tensor_model_parallel_size=4",
            "parallel.pipeline_model_parallel_size=4", "parallel.first_stage_layers=13"],
}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_configs_follow_the_recipe(stage):
    from qwen_merge_mcore.config import load_config

    frozen, lr, template = STAGES[stage]
    for size, overrides in SIZES.items():
        cfg = load_config(REPO / "launch" / f"{stage}.yaml", overrides, check_runtime=False)
        assert cfg.model.preset == f"qwen-merge-72bvit-{size}"
        t, d = cfg.train, cfg.data
        assert (t.stage, t.freeze, t.lr, d.template) == (stage, frozen, lr, template)
        assert (t.lr_decay_style, t.lr_warmup_fraction, cfg.precision.params_dtype) == ("cosine", 0.05, "bf16")
        assert (d.seq_length, d.max_pixels) == (8096, 262144)
        assert t.global_batch_samples == STAGE_BATCHES[stage][0]
    tiny = load_config(REPO / "launch" / "tiny" / f"{stage}.yaml")
    assert (tiny.model.preset, tiny.train.freeze, tiny.data.template) == ("tiny", frozen, template)
    assert tiny.parallel.tensor_model_parallel_size == 2


# Per stage: the recipe's samples per step and a typical sample length (launch/stage*.yaml comments).
STAGE_BATCHES = {"stage1": (256, 360), "stage2.1": (512, 370), "stage2.2": (512, 675), "stage3": (128, 2700)}


def _dotted(fragment: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in fragment.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={'null' if value is None else value}")
    return out


def planned_stage_overrides(stage: str, gpus: int) -> list[str]:
    """The planner's best layout for this stage's batch on `gpus` H100s, as `--write-override`
    writes it, in dotted form."""
    from qwen_merge_mcore.perf.hardware import gpu_spec
    from qwen_merge_mcore.perf.models import plan_model
    from qwen_merge_mcore.perf.planner import CostModel, LayoutChoice, Workload, plan
    from qwen_merge_mcore.perf.report import override_dict

    samples, length = STAGE_BATCHES[stage]
    frozen = STAGES[stage][0]
    work = Workload(seq_length=8096, global_batch_samples=samples, sample_length=length,
                    image_grids_per_sample=((1, 36, 36),), freeze=tuple(frozen))
    result = plan(plan_model("qwen-merge-72bvit-8b"), work, gpus, gpu_spec("h100-80gb"), LayoutChoice(), CostModel())
    return _dotted(override_dict(result, result.best))


@pytest.mark.parametrize("gpus", [8, 64, 256])
def test_stage_configs_load_for_the_planned_layouts(gpus):
    from qwen_merge_mcore.config import load_config

    for stage, (samples, _) in STAGE_BATCHES.items():
        cfg = load_config(REPO / "launch" / f"{stage}.yaml", planned_stage_overrides(stage, gpus), check_runtime=False,
                          world_size=gpus)
        assert cfg.train.global_batch_samples == samples  # the YAML's and the planner's unit agree
        assert cfg.data_parallel_size(gpus) * cfg.parallel.model_parallel_size == gpus
