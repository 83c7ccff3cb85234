NAME = "train"
HELP = ("Train one stage (stage1, stage2.1, stage2.2, stage3) from a YAML config, on GPUs (Megatron-Core DDP, "
        "distributed optimizer, pipeline schedules) or CPU; under torchrun or srun, one process per device.")
EXAMPLES = [
    "qmm train --config launch/stage3.yaml",
    "qmm train --config launch/stage1.yaml model.preset=qwen-merge-72bvit-32b parallel.tensor_model_parallel_size=4 "
    "parallel.pipeline_model_parallel_size=4 parallel.first_stage_layers=13",
    "qmm train --config launch/tiny/stage3.yaml train.train_iters=20   # CPU, 2 processes via torchrun or srun",
]


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="stage YAML (launch/stage*.yaml, launch/tiny/stage*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 checkpoint.save=/ckpt/run")


def run(args) -> int:
    from ..config import load_config
    from ..training.launch import train_main

    return train_main(load_config(args.config, args.overrides))
