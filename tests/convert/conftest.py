"""Session fixture of tests/convert: every layout converted in one spawned 4-rank CPU group
(parallel state rebuilt per layout), then reloaded at other layouts by Megatron.

Layouts: Qwen-Merge (TP 1/2, PP 1/2, VPP 2, uneven first stage), untied and tied Qwen3, plain
Qwen2.5-VL (its text model has one KV head: TP 1 only), and a Qwen3 with 4 KV heads for TP=4
(the tiny fixtures' 2 KV groups / 2 ViT heads refuse TP=4). LEGACY: checkpoints with the local
spec's older norm names, which must still load and export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .workers import Job, convert_then_reload

LAYOUTS = {  # name -> (tp, pp, vpp, first_stage_layers)
    "merge": [(1, 1, None, None), (2, 1, None, None), (2, 2, None, None), (1, 2, 2, None), (1, 2, None, 1)],
    "qwen3": [(2, 2, None, None)],
    "qwen3-tied": [(1, 1, None, None), (2, 2, None, None), (1, 2, 2, None)],
    "qwen2_5_vl": [(1, 1, None, None), (1, 2, None, None)],
    "qwen3-kv4": [(4, 1, None, None)],
}
# (checkpoint written at, loaded at): Megatron's resharding on load.
RELOADS = [("merge", (2, 2, None, None), (1, 1, None, None)), ("merge", (1, 1, None, None), (2, 2, None, None)),
           ("merge", (2, 1, None, None), (1, 2, 2, None)), ("qwen3-tied", (1, 2, 2, None), (2, 2, None, None)),
           ("qwen3-kv4", (4, 1, None, None), (2, 2, None, None))]
LEGACY = {"merge": (2, 1, None, None), "qwen3-tied": (1, 2, None, None)}  # name -> layout written at
LEGACY_RELOADS = [("merge", (1, 2, 2, None)), ("qwen3-tied", (2, 1, None, None))]


def _kv4(tiny, out):
    """A tiny Qwen3 whose 4 KV heads allow TP=4."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    import shutil

    cfg = json.loads((tiny["qwen3"] / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    torch.manual_seed(3)
    Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny["qwen3"] / f, out / f)
    return out


def _dir(name, layout):
    return f"{name}-" + "-".join(str(x) for x in layout)


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    from qwen_merge_mcore.checkpoint.build import build_qwen_merge
    from qwen_merge_mcore.checkpoint.common import HF_META, copy_hf_meta
    from qwen_merge_mcore.testing import run_distributed

    root = tmp_path_factory.mktemp("convert")
    sources = dict(tiny)
    sources["merge"] = build_qwen_merge(tiny["qwen2_5_vl"], tiny["qwen3"], root / "merge-hf", progress=False).out
    sources["qwen3-kv4"] = _kv4(tiny, root / "qwen3-kv4-hf")
    jobs, ckpts = [], {}
    for name, layouts in LAYOUTS.items():
        for layout in layouts:
            out = root / _dir(name, layout)
            out.mkdir()
            ckpts[(name, layout)] = out
            jobs.append(Job(str(sources[name]), str(out), *layout))
    legacy = [Job(str(sources[name]), str(root / f"legacy-{_dir(name, layout)}"), *layout)
              for name, layout in LEGACY.items()]
    for job in legacy:
        Path(job.out).mkdir()
    reloads = [Job(str(sources[name]), str(ckpts[(name, written)]), *at) for name, written, at in RELOADS]
    reloads += [Job(str(sources[name]), str(root / f"legacy-{_dir(name, LEGACY[name])}"), *at)
                for name, at in LEGACY_RELOADS]
    per_rank = run_distributed(convert_then_reload, world_size=4, args=(jobs, legacy, reloads), timeout=900)
    for job in jobs + legacy:  # the parent's part of hf2mcore
        copy_hf_meta(Path(job.hf), Path(job.out) / HF_META)
    return {"sources": sources, "ckpts": ckpts, "legacy": {name: Path(job.out) for name, job in zip(LEGACY, legacy)},
            "written": [r[0] for r in per_rank], "reloaded": per_rank[0][1]}
