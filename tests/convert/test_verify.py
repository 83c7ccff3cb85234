"""What a converted checkpoint promises is checked before it is used: the files against the
CRC32s and sizes in `convert_manifest.json` (by `qmm mcore2hf` and by every load), the config in
`hf_meta/` against the tensors' shapes (by `qmm mcore2hf`). And the shards are no larger than the
weights they hold."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen_merge_mcore.checkpoint.hf2mcore import ConvertOptions, hf_to_mcore
from qwen_merge_mcore.cli import main


@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory):
    """Tiny Qwen3 (TP1, TP2) and Qwen2.5-VL (TP1) checkpoints written by `hf2mcore`, with their manifest."""
    root = tmp_path_factory.mktemp("verify")
    for name in ("qwen3", "qwen2_5_vl"):
        hf_to_mcore(ConvertOptions(hf=str(tiny[name]), out=str(root / name), progress=False, sync_files=False))
    hf_to_mcore(ConvertOptions(hf=str(tiny["qwen3"]), out=str(root / "qwen3-tp2"), tp=2, progress=False,
                               sync_files=False))
    return root


@pytest.fixture
def copy_of(ckpts, tmp_path):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(ckpts / name, dst)
        return dst
    return copy


def _export_refused(ckpt, tmp_path, capsys) -> str:
    out = tmp_path / "hf"
    assert main(["mcore2hf", "--mcore", str(ckpt), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("qmm mcore2hf: error:")]
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))
    return line


def _flip(path, at=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if at is None else at
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_crc(ckpts):
    from qwen_merge_mcore.checkpoint.verify import file_crc32

    files = json.loads((ckpts / "qwen3" / "convert_manifest.json").read_text())["files"]
    assert {"__0_0.distcp", ".metadata", "common.pt", "metadata.json"} <= set(files)
    for name, promised in files.items():
        assert file_crc32(ckpts / "qwen3" / name) == (promised["bytes"], promised["crc32"]), name


def test_export_refuses_a_flipped_byte(copy_of, tmp_path, capsys):
    ckpt = copy_of("qwen3")
    _flip(ckpt / "__0_0.distcp")
    line = _export_refused(ckpt, tmp_path, capsys)
    assert f"{ckpt / '__0_0.distcp'}: CRC32" in line and "the file is corrupt" in line, line


def test_export_refuses_a_truncated_shard(copy_of, tmp_path, capsys):
    ckpt = copy_of("qwen3")
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert f"{shard}: " in _export_refused(ckpt, tmp_path, capsys)


def test_loading_refuses_a_flipped_byte(tiny, ckpts, copy_of):
    """As training loads `checkpoint.pretrained`: two ranks share the check; both refuse."""
    from qwen_merge_mcore.testing import run_distributed

    from .workers import Job, load_errors

    flipped = copy_of("qwen3")
    _flip(flipped / "__0_0.distcp")
    jobs = [Job(str(tiny["qwen3"]), str(ckpt), tp=2) for ckpt in (ckpts / "qwen3", flipped)]
    per_rank = run_distributed(load_errors, world_size=2, tp=2, args=(jobs,))
    assert [errors[0] for errors in per_rank] == ["", ""]
    assert per_rank[0][1] == per_rank[1][1] and f"{flipped / '__0_0.distcp'}: CRC32" in per_rank[0][1], per_rank


EDITS = [  # (model, config field, edited value, what the tensors say)
    ("qwen3", "hidden_size", 256, "128"),
    ("qwen3", "num_hidden_layers", 6, "4"),
    ("qwen3", "num_attention_heads", 8, "4"),
    ("qwen3", "num_key_value_heads", 1, "2"),
    ("qwen3", "head_dim", 32, "64"),
    ("qwen3", "intermediate_size", 512, "256"),
    ("qwen3", "vocab_size", 2000, "1024 rows"),
    ("qwen3", "tie_word_embeddings", True, "false"),
    ("qwen2_5_vl", "text_config.hidden_size", 256, "192"),
    ("qwen2_5_vl", "vision_config.depth", 2, "4"),
    ("qwen2_5_vl", "vision_config.hidden_size", 64, "128"),
    ("qwen2_5_vl", "vision_config.intermediate_size", 100, "172"),
    ("qwen2_5_vl", "vision_config.out_hidden_size", 96, "192"),
]


@pytest.mark.parametrize("name,field,value,tensors", EDITS, ids=[f"{n}-{f}" for n, f, _, _ in EDITS])
def test_export_refuses_a_config_that_disagrees_with_the_tensors(name, field, value, tensors, copy_of, tmp_path,
                                                                 capsys):
    ckpt = copy_of(name)
    path = ckpt / "hf_meta" / "config.json"
    cfg = json.loads(path.read_text())
    *outer, key = field.split(".")
    (cfg[outer[0]] if outer else cfg)[key] = value
    path.write_text(json.dumps(cfg))
    line = _export_refused(ckpt, tmp_path, capsys)
    assert f"{path} does not describe this checkpoint's weights: {field} is {json.dumps(value)}, the tensors say " \
           f"{tensors}" in line, line


def test_export_takes_a_run_folder_at_its_latest_checkpoint(ckpts, tmp_path):
    """What `checkpoint.pretrained` accepts: the iteration `latest_checkpointed_iteration.txt` names."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(ckpts / "qwen3", run / "iter_0000004")
    shutil.copytree(ckpts / "qwen2_5_vl", run / "iter_0000002")  # an older checkpoint of the run
    (run / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert main(["mcore2hf", "--mcore", str(run), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert main(["mcore2hf", "--mcore", str(ckpts / "qwen3"), "--out", str(tmp_path / "ref"), "--no-progress"]) == 0
    got, want = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


# torch.save's zip framing around each tensor (headers, pickle, alignment): about 1.5 KB.
FRAMING = 2048


@pytest.mark.parametrize("name", ["qwen3", "qwen3-tp2"])
def test_the_shards_hold_only_the_weights(tiny, ckpts, name):
    """Within 1% of the HF weights (vocabulary padding) plus framing: each tensor's own bytes,
    not the whole buffer it was sliced from (which took 1.6x the weights at TP2)."""
    from qwen_merge_mcore.checkpoint.safetensors_io import SafetensorsFolder

    weights = SafetensorsFolder(tiny["qwen3"]).total_bytes
    manifest = json.loads((ckpts / name / "convert_manifest.json").read_text())
    shards = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".distcp"))
    assert shards <= 1.01 * weights + FRAMING * len(manifest["tensors"]), (shards, weights)
