"""Per-rank bodies of the sample-batch tests: the real data pipeline (tiny data, tiny tokenizer)
feeding the training loop on CPU ranks (module-level, so spawned ranks can import them)."""

from __future__ import annotations

import torch.distributed as dist

from qwen_merge_mcore.models.qwen_merge import build_model, freeze
from qwen_merge_mcore.training import data_source
from qwen_merge_mcore.training.loop import run_training
from qwen_merge_mcore.training.model_provider import ModelBuilder

from .helpers import tiny_config

BUILDER = ModelBuilder(build_model, freeze)


class SeenSamples:
    """The real data source, recording the samples of each step this rank trained on."""

    def __init__(self, source):
        self.source, self.steps = source, []

    def next_step(self) -> int:
        self.steps.append([])
        return self.source.next_step()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.source)
        self.steps[-1] += self.source.last_row_ids
        return batch

    def __len__(self) -> int:
        return len(self.source)

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def config(data_dir: str, tokenizer: str, steps: int, save: str | None = None):
    return tiny_config(
        train={"global_batch_samples": 8, "train_iters": steps, "lr_decay_style": "constant", "lr": 3e-3},
        data={"template": "qwen3", "tokenizer": tokenizer, "seq_length": 256, "max_pixels": 12544,
              "num_workers": 0, "datasets": [{"path": f"{data_dir}/captions.jsonl", "name": "captions"},
                                             {"path": f"{data_dir}/instruct.jsonl", "name": "instruct"}]},
        checkpoint={"save": save, "save_interval": 2})


def train_case(data_dir: str, tokenizer: str, steps: int, save: str | None = None) -> dict:
    """Losses and, per step, the samples of all DP ranks together (sorted)."""
    seen = {}

    def make_data(cfg, rank, size):
        seen["source"] = SeenSamples(data_source.build_data(cfg, rank, size))
        return seen["source"]

    summary = run_training(config(data_dir, tokenizer, steps, save), BUILDER, make_data)
    mine = seen["source"].steps
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    per_step = [sorted(s for rank in every for s in rank[i]) for i in range(len(mine))]
    return {"losses": summary.losses, "samples": per_step, "first": summary.first_iteration,
            "position": seen["source"].state_dict()["offset"]}
