"""Video frames at a configured fps, bounded frame count and pixels, in the ViT's patch layout.

Frame selection follows qwen-vl-utils: nframes = duration x fps, clamped to
[temporal_patch_size, video_max_frames] and rounded down to a multiple of temporal_patch_size,
spread evenly over the clip; each temporal patch then spans temporal_patch_size / sample_fps
seconds (`second_per_grid_t`, which MRoPE needs).

Decode: DALI's video decoder where it supports the codec (its `mixed` GPU backend: H.264, HEVC,
AV1, MPEG-4, VP8, VP9, MJPEG; its CPU backend only VP8, VP9 and MJPEG, checked with DALI 2.4),
otherwise PyAV (FFmpeg) on CPU. Resize and normalise then run in DALI as for images.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .errors import BadSample
from .vision import SYNC_EXECUTOR, VisionSpec, dali_error, dali_to_torch, normalize_graph, patchify, smart_resize

DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg"}


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    num_frames: int
    fps: float
    height: int
    width: int


@dataclass(frozen=True)
class VideoPlan:
    frames: tuple[int, ...]  # frame indices to decode
    size: tuple[int, int]  # resized (h, w)
    second_per_grid_t: float
    grid_thw: tuple[int, int, int]


def probe_video(data: bytes) -> VideoInfo:
    """Container metadata without decoding frames. Raises BadSample for unreadable files."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames
            if not frames:  # WebM/MKV do not record it: count packets (no decoding)
                frames = sum(1 for p in container.demux(stream) if p.size)
            info = VideoInfo(stream.codec_context.name, int(frames), fps, stream.height, stream.width)
    except (av.FFmpegError, IndexError, ValueError) as err:
        raise BadSample("bad_video", f"unreadable video: {err}") from None
    if info.num_frames <= 0 or info.fps <= 0:
        raise BadSample("bad_video", f"video without frame count or rate ({info})")
    return info


def plan_video(info: VideoInfo, spec: VisionSpec) -> VideoPlan:
    t = spec.temporal_patch_size
    duration = info.num_frames / info.fps
    n = int(round(duration * spec.video_fps))
    n = max(t, min(n, spec.video_max_frames, info.num_frames - info.num_frames % t or t))
    n -= n % t
    frames = tuple(int(i) for i in np.linspace(0, info.num_frames - 1, n).round())
    h, w = smart_resize(info.height, info.width, spec.factor, spec.min_pixels, spec.video_max_pixels)
    sample_fps = n / info.num_frames * info.fps
    grid = (n // t, h // spec.patch_size, w // spec.patch_size)
    return VideoPlan(frames, (h, w), t / sample_fps, grid)


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float


class VideoProcessor:
    """One video at a time (a clip is already a batch of frames)."""

    def __init__(self, spec: VisionSpec, device_id: Optional[int] = None, num_threads: int = 2):
        self.spec, self.device_id, self.num_threads = spec, device_id, num_threads
        self._decode_pipe = None
        self._frames_pipe = None

    def __call__(self, data: bytes) -> ProcessedVideo:
        info = probe_video(data)
        plan = plan_video(info, self.spec)
        on_gpu = self.device_id is not None
        try:
            if on_gpu or info.codec in DALI_CPU_CODECS:
                patches = self._dali_decode(data, plan)
            else:
                patches = self._frames(self._pyav_decode(data, plan), plan)
        except RuntimeError as err:
            # A failed DALI pipeline cannot be reused; a short clip fails the patch reshape.
            self._decode_pipe = self._frames_pipe = None
            raise BadSample("bad_video", f"failed to decode: {dali_error(err)}") from None
        return ProcessedVideo(patches, plan.grid_thw, plan.second_per_grid_t)

    def _dali_decode(self, data: bytes, plan: VideoPlan) -> torch.Tensor:
        if self._decode_pipe is None:
            self._decode_pipe = _build_video_pipeline(self.device_id, self.num_threads, self.spec, decode=True)
        pipe = self._decode_pipe
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
        pipe.feed_input("frames", [np.array(plan.frames, dtype=np.int32)])
        self._feed_plan(pipe, plan)
        (out,) = pipe.run()
        return patchify(dali_to_torch(out, 0), self.spec)

    def _feed_plan(self, pipe, plan: VideoPlan) -> None:
        pipe.feed_input("size", [np.array(plan.size, dtype=np.float32)])

    def _pyav_decode(self, data: bytes, plan: VideoPlan) -> np.ndarray:
        import av

        wanted = set(plan.frames)
        picked: dict[int, np.ndarray] = {}
        try:
            with av.open(io.BytesIO(data)) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        picked[i] = frame.to_ndarray(format="rgb24")
                    if i >= plan.frames[-1]:
                        break
        except av.FFmpegError as err:
            raise BadSample("bad_video", f"failed to decode: {err}") from None
        if not picked:
            raise BadSample("bad_video", "no frame decoded")
        # A container may over-report its frame count: repeat the last decoded frame.
        last = picked[max(picked)]
        return np.stack([picked.get(i, last) for i in plan.frames])

    def _frames(self, frames: np.ndarray, plan: VideoPlan) -> torch.Tensor:
        if self._frames_pipe is None:
            self._frames_pipe = _build_video_pipeline(self.device_id, self.num_threads, self.spec, decode=False)
        pipe = self._frames_pipe
        pipe.feed_input("frames_in", [frames], layout="FHWC")
        self._feed_plan(pipe, plan)
        (out,) = pipe.run()
        return patchify(dali_to_torch(out, 0), self.spec)


def _build_video_pipeline(device_id: Optional[int], num_threads: int, spec: VisionSpec, decode: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=device_id, **SYNC_EXECUTOR)
    def graph():
        size = fn.external_source(name="size", dtype=types.FLOAT)
        if decode:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            frames = fn.external_source(name="frames", dtype=types.INT32)
            clip = fn.decoders.video(encoded, frames=frames, device="cpu" if device_id is None else "mixed")
        else:
            clip = fn.external_source(name="frames_in", dtype=types.UINT8, layout="FHWC")
            if device_id is not None:
                clip = clip.gpu()
        return normalize_graph(clip, size, sequence=True)

    pipe = graph()
    pipe.build()
    return pipe
