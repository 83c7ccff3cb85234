"""Image preprocessing with NVIDIA DALI, in the exact layout of Qwen2-VL's image processor.

decode -> Qwen2.5-VL smart resize (sides multiples of patch*merge = 28, area within
[min_pixels, max_pixels]) -> bicubic resize -> CLIP normalise, in DALI; then `patchify` cuts the
planar result into patches with one torch copy. On a GPU the decode is DALI's `mixed`
(nvImageCodec on the device) and resize/normalise/patchify run on the device; on CPU the same
graph runs with `device_id=None`.

DALI aborts a whole pipeline on one undecodable image (and the pipeline cannot be reused), so
`check_encoded_image` rejects truncated and unreadable files from their bytes before they reach it,
and `ImageProcessor` rebuilds its pipeline and retries one by one if something slips through.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .errors import BadSample

# OpenAI CLIP statistics, what Qwen2-VL's processor normalises with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses more extreme images


@dataclass(frozen=True)
class VisionSpec:
    """What the ViT expects and the pixel budgets of the data config."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 262144
    video_fps: float = 2.0
    video_max_frames: int = 64
    video_max_pixels: int = 50176

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_configs(cls, data_cfg, model_cfg) -> "VisionSpec":
        v = model_cfg.vision
        return cls(v.patch_size, v.temporal_patch_size, v.spatial_merge_size, data_cfg.min_pixels,
                   data_cfg.max_pixels, data_cfg.video_fps, data_cfg.video_max_frames, data_cfg.video_max_pixels)

    def image_grid(self, height: int, width: int) -> tuple[int, int, int]:
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def merged_tokens(self, grid: Sequence[int]) -> int:
        t, h, w = grid
        return t * (h // self.merge_size) * (w // self.merge_size)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's rule: round each side to a multiple of `factor`, then scale into the pixel budget."""
    if min(height, width) <= 0:
        raise BadSample("bad_image", f"image of size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadSample("bad_image", f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize_graph(frames, size, sequence: bool):
    """DALI nodes: decoded uint8 HWC images (or FHWC clips) -> resized, normalised float CHW (FCHW).

    PIL's BICUBIC (transformers' reference) is Keys' cubic, widened when shrinking; DALI's
    INTERP_CUBIC with antialias=True is the same filter. Both round the result to uint8, then
    crop_mirror_normalize casts, normalises and makes the image planar in one fused pass.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    x = fn.resize(frames, size=size, interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="FCHW" if sequence else "CHW",
                                    mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])


def patchify(frames: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """Normalised [F, C, H, W] frames -> [patches, C*T*P*P] in Qwen2-VL's order: rows walk the
    grid (t, h/m, w/m, m, m), so the 2x2 patches the projector merges are consecutive. An image
    (F = 1) fills one temporal patch by repetition, as in Qwen2-VL.

    One strided copy on the host (or device) does the reorder and the repetition: cheaper than
    DALI's generic transpose on CPU. The permutation moves C inside the patch, so the result never
    aliases `frames` and outlives DALI's output buffer.
    """
    f, c, h, w = frames.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if f == 1:
        frames, f = frames.expand(t, c, h, w), t
    x = frames.reshape(f // t, t, c, h // (p * m), m, p, w // (p * m), m, p)
    return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(-1, c * t * p * p)


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the header, after checking the file is complete. Raises BadSample."""
    check_encoded_image(data)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            # DALI applies the EXIF orientation when decoding; 5..8 swap the sides.
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadSample("bad_image", f"unreadable image: {err}") from None
    return height, width


_JPEG_EOI = b"\xff\xd9"
_PNG_SIG, _PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def check_encoded_image(data: bytes) -> None:
    """Reject empty and truncated JPEG/PNG files from their bytes (cheap; no decode)."""
    if not data:
        raise BadSample("bad_image", "empty image file")
    if data[:3] == b"\xff\xd8\xff":
        # Encoders may append padding or metadata after EOI, so look near the end.
        if _JPEG_EOI not in data[-1024:]:
            raise BadSample("bad_image", "truncated JPEG (no end-of-image marker)")
    elif data[:8] == _PNG_SIG:
        if _PNG_IEND not in data[-64:]:
            raise BadSample("bad_image", "truncated PNG (no IEND chunk)")


# Callers feed one batch and wait for it, so DALI's asynchronous, pipelined executors only add
# thread hand-offs: the synchronous one is ~5% faster on CPU (bench/bench_data.py).
SYNC_EXECUTOR = dict(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)


def _build_image_pipeline(batch_size: int, device_id: Optional[int], num_threads: int):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, **SYNC_EXECUTOR)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        size = fn.external_source(name="size", dtype=types.FLOAT)
        decoded = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                    output_type=types.RGB)
        return normalize_graph(decoded, size, sequence=False)

    pipe = graph()
    pipe.build()
    return pipe


def dali_error(err: Exception) -> str:
    """The informative line of a DALI pipeline error (the rest is traceback boilerplate)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for key in ("Failed to decode", "Could not", "not supported", "Assert on"):
        for ln in lines:
            if key in ln:
                return ln.rstrip(" :")[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]


def dali_to_torch(tensor_list, index: int) -> torch.Tensor:
    """One sample of a DALI output as a torch tensor on the same device. On CPU it is a view of
    DALI's buffer, valid until the pipeline runs again: callers copy it."""
    from nvidia.dali.backend import TensorGPU

    item = tensor_list[index]
    if isinstance(item, TensorGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(item.shape(), dtype=torch.float32, device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(item, out, cuda_stream=torch.cuda.current_stream())
        return out
    return torch.from_numpy(np.asarray(item))


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [patches, C*T*P*P] float32
    grid_thw: tuple[int, int, int]
    key: Optional[str] = None  # the ViT feature cache's key (data/vision_cache.py), when one is used


class ImageProcessor:
    """Decode + resize + normalise + patchify batches of encoded images with one DALI pipeline."""

    def __init__(self, spec: VisionSpec, device_id: Optional[int] = None, max_batch: int = 32, num_threads: int = 2):
        self.spec, self.device_id, self.max_batch, self.num_threads = spec, device_id, max_batch, num_threads
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = _build_image_pipeline(self.max_batch, self.device_id, self.num_threads)
        return self._pipe

    def __call__(self, images: Sequence[bytes]) -> list[ProcessedImage]:
        """Raises BadSample whose `index` names the first image that cannot be used."""
        out: list[ProcessedImage] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            try:
                out.extend(self._run(chunk, start))
            except RuntimeError:
                # The pipeline is dead after a decode error: rebuild it and find the culprit.
                self._pipe = None
                for i, data in enumerate(chunk):
                    try:
                        out.extend(self._run([data], start + i))
                    except RuntimeError as err:
                        self._pipe = None
                        raise BadSample("bad_image", f"image {start + i} failed to decode: {dali_error(err)}",
                                        index=start + i) from None
        return out

    def _run(self, chunk: Sequence[bytes], start: int = 0) -> list[ProcessedImage]:
        sizes = []
        for i, data in enumerate(chunk):
            try:
                sizes.append(smart_resize(*image_size(data), self.spec.factor, self.spec.min_pixels,
                                          self.spec.max_pixels))
            except BadSample as err:
                raise BadSample(err.reason, f"image {start + i}: {err.detail}", index=start + i) from None
        pipe = self._pipeline()
        pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in chunk])
        pipe.feed_input("size", [np.array([h, w], dtype=np.float32) for h, w in sizes])
        (result,) = pipe.run()
        p = self.spec.patch_size
        return [ProcessedImage(patchify(dali_to_torch(result, i)[None], self.spec), (1, h // p, w // p))
                for i, (h, w) in enumerate(sizes)]
