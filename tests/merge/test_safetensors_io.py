"""Streaming safetensors folders: sharded writing (whole tensors or row slices) with an index,
clear errors on damaged input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_merge_mcore.checkpoint.safetensors_io import (CheckpointError, SafetensorsFolder, ShardedSafetensorsWriter,
                                                        TensorSpec, parse_size)

TENSORS = {
    "a.weight": torch.randn(64, 32).to(torch.bfloat16),  # 4096 bytes
    "b.weight": torch.randn(16, 16),  # 1024 bytes
    "c.ids": torch.arange(7, dtype=torch.int64),
    "d.scalar": torch.tensor(3.5),
    "e.empty": torch.zeros(0, 4, dtype=torch.float16),
    "f.big": torch.randn(2048).to(torch.float16),  # 4096 bytes
}


def _specs(tensors):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _write(folder, tensors, max_shard_bytes, order=None):
    w = ShardedSafetensorsWriter(folder, _specs(tensors), max_shard_bytes)
    for name in order or tensors:
        w.write(name, tensors[name])
    w.close()


def test_sharded_write_in_any_order_reads_back_exactly(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=5000, order=list(reversed(TENSORS)))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())
    for f in files:  # the safetensors library itself accepts every shard
        for name, tensor in load_file(tmp_path / f).items():
            assert index["weight_map"][name] == f and torch.equal(tensor, TENSORS[name])
    r = SafetensorsFolder(tmp_path)
    assert sorted(r.names()) == sorted(TENSORS)
    for name, tensor in TENSORS.items():
        assert r.spec(name) == TensorSpec(name, tuple(tensor.shape), tensor.dtype)
        got = r.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_rows_are_read_and_written_in_slices(tmp_path):
    big = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    w = ShardedSafetensorsWriter(tmp_path, [TensorSpec("m", (10, 6), torch.float32)])
    for start, stop in ((7, 10), (0, 3)):  # any order, each row once
        w.write_rows("m", big[start:stop], start)
    with pytest.raises(ValueError, match="at row 9"):
        w.write_rows("m", big[:2], 9)  # would run past the last row
    with pytest.raises(CheckpointError, match="never written: m"):
        w.close()  # rows 3-6 are still missing
    w.write_rows("m", big[3:7], 3)
    w.close()
    r = SafetensorsFolder(tmp_path)
    assert torch.equal(r.get("m"), big) and torch.equal(r.get("m", slice(2, 5)), big[2:5])
    assert r.get("m", slice(4, 4)).shape == (0, 6)


def test_one_shard_is_a_plain_model_safetensors(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert all(torch.equal(v, TENSORS[k]) for k, v in load_file(tmp_path / "model.safetensors").items())


def test_writer_refuses_wrong_tensors_and_unfinished_plans(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path / "w", _specs(TENSORS), 5000)
    with pytest.raises(ValueError, match="planned"):
        w.write("b.weight", torch.randn(16, 16).half())
    with pytest.raises(KeyError, match="not in the output plan"):
        w.write("zzz", torch.ones(1))
    w.write("b.weight", TENSORS["b.weight"])
    with pytest.raises(ValueError, match="already written"):
        w.write("b.weight", TENSORS["b.weight"])
    with pytest.raises(CheckpointError, match="5 planned tensors were never written: a.weight"):
        w.close()
    assert not (tmp_path / "w" / "model.safetensors.index.json").exists()


def test_truncated_shard_is_named(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=5000)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: truncated safetensors file"):
        SafetensorsFolder(tmp_path)
    shard.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="no header"):
        SafetensorsFolder(tmp_path)


def test_missing_shard_is_named(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=5000)
    (tmp_path / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shard\(s\) named in its index: model-00003-of-00003"):
        SafetensorsFolder(tmp_path)


def test_index_promising_absent_tensors_is_refused(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=5000)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in their shard: ghost.weight"):
        SafetensorsFolder(tmp_path)


def test_empty_or_missing_folder(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "other-name.safetensors")
    with pytest.raises(CheckpointError, match="has neither model.safetensors.index.json nor model.safetensors"):
        SafetensorsFolder(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        SafetensorsFolder(tmp_path / "nope")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("123") == 123
    for bad in ("lots", "0", "5XB"):
        with pytest.raises(ValueError):
            parse_size(bad)
