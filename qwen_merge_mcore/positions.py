"""MRoPE position ids (Qwen2.5-VL rule), shared by the data pipeline, the model and the exports.

Text tokens get equal (t, h, w) ids counting up by one, so text-only input is Qwen3's 1D RoPE.
A run of `<|image_pad|>`/`<|video_pad|>` tokens takes the next grid: t = start + frame index x
interval, h/w = start + row/column of the merged grid. Text resumes at max(ids so far) + 1. The
ids of a packed sequence restart at 0 for every sample.

transformers >= 5.x resumes text after a *video* at start + max(h, w) instead; for images (one
temporal patch) both rules agree. vLLM and the original Qwen2.5-VL use max + 1, as here.
"""

from __future__ import annotations

from typing import Sequence

import torch


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
) -> torch.Tensor:
    """Position ids [3, L] for one sample's token ids [L].

    Raises ValueError when the placeholder tokens do not match the grids (one placeholder per
    merged patch, every grid used exactly once).
    """
    ids = input_ids.tolist()
    grids = {image_token_id: _rows(image_grid_thw), video_token_id: _rows(video_grid_thw)}
    used = {image_token_id: 0, video_token_id: 0}
    seconds = list(second_per_grid_ts) if second_per_grid_ts is not None else None
    chunks: list[torch.Tensor] = []
    next_pos = 0
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok not in grids:
            j = i
            while j < len(ids) and ids[j] not in grids:
                j += 1
            chunks.append(torch.arange(next_pos, next_pos + j - i).expand(3, -1))
            next_pos += j - i
            i = j
            continue
        kind = "image" if tok == image_token_id else "video"
        if used[tok] >= len(grids[tok]):
            raise ValueError(f"more {kind} placeholder runs than {kind} grids ({len(grids[tok])})")
        t, h, w = grids[tok][used[tok]]
        count = t * (h // spatial_merge_size) * (w // spatial_merge_size)
        if ids[i:i + count] != [tok] * count:
            have = 0
            while i + have < len(ids) and ids[i + have] == tok:
                have += 1
            raise ValueError(f"{kind} {used[tok]} with grid ({t}, {h}, {w}) needs {count} placeholder "
                             f"tokens, found a run of {have}")
        interval = 1.0
        if tok == video_token_id:
            sec = seconds[used[tok]] if seconds is not None else 1.0
            interval = tokens_per_second * sec
        pos = _grid_positions(t, h // spatial_merge_size, w // spatial_merge_size, interval) + next_pos
        chunks.append(pos)
        next_pos = int(pos.max()) + 1
        used[tok] += 1
        i += count
    for tok, kind in ((image_token_id, "image"), (video_token_id, "video")):
        if used[tok] != len(grids[tok]):
            raise ValueError(f"{len(grids[tok])} {kind} grids but {used[tok]} {kind} placeholder runs")
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(chunks, dim=1).long()


def _grid_positions(t: int, h: int, w: int, interval: float) -> torch.Tensor:
    tt = (torch.arange(t) * interval).long().view(-1, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, -1, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, -1).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def _rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(x) for x in row) for row in grid.reshape(-1, 3).tolist()]


def text_position_ids(length: int) -> torch.Tensor:
    return torch.arange(length).expand(3, -1).clone()
