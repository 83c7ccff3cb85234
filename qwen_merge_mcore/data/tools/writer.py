"""Training-format output: LLaMA-Factory style parquet (`messages` + `images`/`videos`), in shards."""

from __future__ import annotations

from pathlib import Path
from ..sample import Sample

_TAGS = {"image": "<image>", "video": "<video>"}


def sample_to_row(sample: Sample, embed_media: bool = True) -> dict:
    """Messages with <image>/<video> tags; assistant reasoning inline as `<think>..</think>`;
    media as HF `{"bytes", "path"}` structs (bytes read from disk when `embed_media`)."""
    messages = []
    for m in sample.messages:
        text = "".join(p.text if p.type == "text" else _TAGS[p.type] for p in m.parts)
        if m.reasoning is not None:
            text = f"<think>\n{m.reasoning}\n</think>\n\n{text}"
        messages.append({"role": m.role, "content": text})
    return {"id": sample.row_id, "messages": messages,
            "images": [_media(x, embed_media) for x in sample.images],
            "videos": [_media(x, embed_media) for x in sample.videos]}


def _media(item, embed: bool) -> dict:
    if isinstance(item, bytes):
        return {"bytes": item, "path": None}
    if not embed:
        return {"bytes": None, "path": item}
    with open(item, "rb") as f:
        return {"bytes": f.read(), "path": Path(item).name}


class ShardWriter:
    """Streams rows into `out/data-00000.parquet`, ... with `rows_per_shard` rows each."""

    def __init__(self, out: Path, rows_per_shard: int = 10_000, row_group_size: int = 256):
        self.out, self.rows_per_shard, self.row_group_size = Path(out), rows_per_shard, row_group_size
        self.shard, self.rows, self._buffer = 0, 0, []
        self._writer = None

    def write(self, row: dict) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=_SCHEMA())
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.out / f"data-{self.shard:05d}.parquet", table.schema)
        self._writer.write_table(table)
        self.rows += len(self._buffer)
        self._buffer = []
        if self.rows >= (self.shard + 1) * self.rows_per_shard:
            self._writer.close()
            self._writer, self.shard = None, self.shard + 1

    def close(self) -> int:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        return self.rows


def _SCHEMA():
    import pyarrow as pa

    media = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("id", pa.string()), ("messages", pa.list_(message)), ("images", media), ("videos", media)])

