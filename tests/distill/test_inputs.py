"""Question input and the resumable store without vLLM: stable ids, malformed rows counted,
shards by id, no half-written file that looks like a shard."""

from __future__ import annotations

import json
from collections import Counter

import pytest


def test_rows_without_ids_get_stable_ids_and_bad_rows_are_counted(tmp_path):
    from qwen_merge_mcore.distill.questions import read_questions

    rows = [{"question": "a?", "answer": "1"}, {"instruction": "b", "output": "2"}, {"nonsense": True},
            {"messages": [{"role": "user"}]}, {"question": "a?", "answer": "1"}, "a string"]
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = Counter()
    first = [q.id for q in read_questions(str(src), tmp_path / "out", bad)]
    assert bad == Counter(malformed_row=3, duplicate_id=1)
    src.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))  # reordered: same ids
    assert sorted(q.id for q in read_questions(str(src), tmp_path / "out", Counter())) == sorted(first)
    assert len(first) == 2 and all(i.startswith("h") and len(i) == 17 for i in first)


def test_shards_split_by_id_cover_every_question_once():
    from qwen_merge_mcore.distill.generate import in_shard, parse_shard

    ids = [f"q{i}" for i in range(200)]
    shards = [[i for i in ids if in_shard(i, (k, 4))] for k in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids) and all(shards)
    with pytest.raises(ValueError, match="needs 0 <= i < n"):
        parse_shard("4/4")


def test_killed_writes_never_look_like_a_shard(tmp_path):
    from qwen_merge_mcore.data.readers import dataset_files
    from qwen_merge_mcore.distill.store import Store

    store = Store(tmp_path, (0, 1))
    store.commit(["a"], [{"id": "a"}], Counter())
    # A kill mid-write leaves a temp name; a kill between the two renames leaves a data file
    # without its progress file. Neither counts as done, and the next start removes both.
    dead = 2 ** 22 + 7
    (tmp_path / f".data-{store.tag}-000001.jsonl.tmp-{dead}").write_text('{"id": "b"')
    (tmp_path / f"data-{store.tag}-000002.jsonl").write_text('{"id": "c"}\n')
    assert dataset_files(str(tmp_path)) == [str(tmp_path / f"data-{store.tag}-00000{k}.jsonl") for k in (0, 2)]
    again = Store(tmp_path, (0, 1))
    assert again.done == {"a"} and again.rows == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"data-{store.tag}-000000.jsonl", "progress"]
    again.commit(["b"], [], Counter(length=1))
    assert Store(tmp_path, (0, 1)).dropped == Counter(length=1)
