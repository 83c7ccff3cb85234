"""Streaming safetensors folders: sharded writing with an index, clear errors on damaged input."""

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
    with ShardedSafetensorsWriter(folder, _specs(tensors), max_shard_bytes) as w:
        for name in order or tensors:
            w.write(name, tensors[name])


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
    with SafetensorsFolder(tmp_path) as r:
        assert r.names() == sorted(TENSORS)
        for name, tensor in TENSORS.items():
            assert r.spec(name) == TensorSpec(name, tuple(tensor.shape), tensor.dtype)
            got = r.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_rows_are_read_and_written_in_slices(tmp_path):
    big = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    with ShardedSafetensorsWriter(tmp_path, [TensorSpec("m", (10, 6), torch.float32)]) as w:
        for start, stop in ((7, 10), (0, 3), (3, 7)):  # any order, each row once
            w.write("m", big[start:stop], row_start=start)
        with pytest.raises(ValueError, match="at row 9"):
            w.write("m", big[:2], row_start=9)  # would run past the last row
    with SafetensorsFolder(tmp_path) as r:
        assert torch.equal(r.get("m"), big) and torch.equal(r.get("m", (2, 5)), big[2:5])
        assert r.get("m", (4, 4)).shape == (0, 6)
        with pytest.raises(ValueError, match="out of range"):
            r.get("m", (8, 11))


def test_one_shard_is_a_plain_model_safetensors(tmp_path):
    _write(tmp_path, TENSORS, max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert all(torch.equal(v, TENSORS[k]) for k, v in load_file(tmp_path / "model.safetensors").items())


def test_reader_takes_unindexed_folders_of_several_files(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "one.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "two.safetensors")
    with SafetensorsFolder(tmp_path) as r:
        assert r.names() == ["x", "y"] and torch.equal(r.get("y"), torch.zeros(3))


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
    message = r"missing shard\(s\) named in model.safetensors.index.json \(1 of 3\): model-00003-of-00003"
    with pytest.raises(CheckpointError, match=message):
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
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        SafetensorsFolder(tmp_path)
    with pytest.raises(CheckpointError, match="is not a folder"):
        SafetensorsFolder(tmp_path / "nope")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("123") == 123
    for bad in ("lots", "0", "5XB"):
        with pytest.raises(ValueError):
            parse_size(bad)
