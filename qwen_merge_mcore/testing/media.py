"""Generated images, videos and dataset rows for tests and benchmarks (no downloads)."""

from __future__ import annotations

import io

import numpy as np


def make_image_array(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Gradients, stripes and noise: smooth and sharp content, so resampling differences show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255.0 / max(width, 1), y * 255.0 / max(height, 1), ((x // 7 + y // 5) % 2) * 200.0], -1)
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def encode_image(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_image(height: int, width: int, fmt: str = "JPEG", seed: int = 0) -> bytes:
    return encode_image(make_image_array(height, width, seed), fmt)


def make_video(num_frames: int, height: int, width: int, fps: int = 10, codec: str = "libvpx-vp9",
               container: str = "webm", seed: int = 0) -> bytes:
    """An encoded clip whose frames change over time (needs PyAV)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.roll(make_image_array(height, width, seed), shift=3 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_rows(path, rows: list[dict]) -> str:
    """Rows to .jsonl or .parquet (by extension); returns the path."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)
