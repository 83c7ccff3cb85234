"""The output folder of a resumable run, order-safe and crash-safe.

Each chunk of questions is committed as two files, each written atomically (temporary name,
then rename): `data-<shard>-<seq>.jsonl` (the kept rows, in the training format) and then
`progress/<shard>-<seq>.json` (the ids the chunk finished, and what it dropped). A question is
done when a progress file names it; a data file without its progress file (a kill between the two
renames) is removed on the next start and its questions are asked again, with the same seeds.
So every question is answered exactly once, and a half-written file never has a name that a
reader (or `data.datasets`) takes for a shard.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from ..utils.atomic import atomic_write_text, log

_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


class Store:
    def __init__(self, out: Path, shard: tuple[int, int]):
        self.out, self.progress = Path(out), Path(out) / "progress"
        self.progress.mkdir(parents=True, exist_ok=True)
        self.tag = f"s{shard[0]:04d}of{shard[1]:04d}"
        self._clean()
        self.done: set[str] = set()
        self.dropped: Counter = Counter()
        self.rows = 0
        for path in sorted(self.progress.glob("*.json")):
            record = json.loads(path.read_text())
            self.done.update(record["ids"])
            self.dropped.update(record["dropped"])
            self.rows += record["rows"]
        mine = sorted(self.progress.glob(f"{self.tag}-*.json"))
        self._seq = int(mine[-1].stem.rsplit("-", 1)[1]) + 1 if mine else 0

    def _clean(self) -> None:
        """This shard's temporary files of dead processes, and its data files whose progress file
        never came. Other shards' files are theirs: their jobs may be running on other nodes."""
        for folder in (self.out, self.progress):
            for path in folder.glob(f".*{self.tag}-*.tmp-*"):
                m = _TEMP.match(path.name)
                if m and not _alive(int(m.group(1))):
                    path.unlink(missing_ok=True)
        for path in self.out.glob(f"data-{self.tag}-*.jsonl"):
            if not (self.progress / (path.stem[len("data-"):] + ".json")).exists():
                log.warning("removing %s: its chunk was not committed (the run was killed); asking again", path)
                path.unlink()

    def commit(self, ids: list[str], rows: list[dict], dropped: Counter) -> None:
        name = f"{self.tag}-{self._seq:06d}"
        if rows:
            atomic_write_text(self.out / f"data-{name}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        atomic_write_text(self.progress / f"{name}.json",
                          json.dumps({"ids": ids, "rows": len(rows), "dropped": dict(dropped)}))
        self._seq += 1
        self.done.update(ids)
        self.dropped.update(dropped)
        self.rows += len(rows)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_rows(folder: Path) -> list[dict]:
    """Every row of a store's data files, in file order."""
    rows = []
    for path in sorted(Path(folder).glob("data-*.jsonl")):
        rows.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return rows
