"""The te spec reads the checkpoint `qmm hf2mcore` writes (built with the local spec), and writes
one the local spec reads back: one torch_dist layout for both backends. Needs CUDA and
Transformer Engine."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.te]


def _by_key(chunks) -> dict[tuple, torch.Tensor]:
    """(checkpoint key, global offset) -> this rank's tensor, for every tensor of the chunks."""
    from qwen_merge_mcore.checkpoint.common import model_state
    from qwen_merge_mcore.checkpoint.hf_source import sharded_tensors

    return {(t.key, tuple(t.global_offset)): t.data.detach().cpu() for t in sharded_tensors(model_state(chunks))}


def _te_round_trip(ckpt: str, hf: str, out: str) -> dict:
    from megatron.core import dist_checkpointing

    from qwen_merge_mcore.checkpoint.common import (converter_experiment, load_model, model_chunks, model_state,
                                                    read_model_config)
    from qwen_merge_mcore.checkpoint.cpu_compat import save_dist_checkpoint
    from qwen_merge_mcore.checkpoint.hf_source import load_hf_weights
    from qwen_merge_mcore.config import ParallelConfig

    def chunks(backend: str) -> tuple[list, object]:
        cfg = read_model_config(f"{hf}/config.json")[1]
        cfg.backend = backend
        return model_chunks(converter_experiment(cfg, ParallelConfig(), "bf16")), cfg

    reference, cfg = chunks("local")
    for chunk in reference:
        load_hf_weights(chunk, hf, cfg)
    expected = _by_key(reference)
    te, _ = chunks("te")
    load_model(te, ckpt)  # the converter's checkpoint, no TE _extra_state in it
    got_te = _by_key(te)
    save_dist_checkpoint(model_state(te), out)
    back, _ = chunks("local")
    load_model(back, out)
    stored = lambda d: {k for k in dist_checkpointing.load_tensors_metadata(d) if not k.endswith("_extra_state")}  # noqa: E731
    return {"te_keys_equal": set(got_te) == set(expected),
            "te_differs": sorted(str(k) for k in expected if not torch.equal(got_te[k], expected[k])),
            "back_differs": sorted(str(k) for k, v in _by_key(back).items() if not torch.equal(v, expected[k])),
            "same_keys_on_disk": stored(out) == stored(ckpt)}


def test_te_spec_loads_the_converted_checkpoint_and_back(converted, distributed, tmp_path):
    hf = converted["sources"]["merge"]
    ckpt = converted["ckpts"][("merge", (1, 1, None, None))]
    (tmp_path / "te").mkdir()
    r = distributed(_te_round_trip, world_size=1, args=(str(ckpt), str(hf), str(tmp_path / "te")))[0]
    assert r["te_keys_equal"] and r["same_keys_on_disk"], r
    assert r["te_differs"] == [] and r["back_differs"] == [], r  # bit-exact: the same bf16 tensors
