"""DALI preprocessing against transformers' Qwen2-VL image processor, video frames, bad images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from qwen_merge_mcore.data.errors import BadSample
from qwen_merge_mcore.data.video import VideoProcessor, plan_video, probe_video
from qwen_merge_mcore.data.vision import CLIP_MEAN, CLIP_STD, ImageProcessor, VisionSpec, image_size, smart_resize
from qwen_merge_mcore.testing.media import make_image, make_video

SPEC = VisionSpec(min_pixels=3136, max_pixels=200_000)
# (height, width, format): upscales to min_pixels, downscales past max_pixels, extreme aspect, exact size.
CASES = [(300, 401, "JPEG"), (37, 900, "PNG"), (1024, 768, "JPEG"), (20, 30, "PNG"), (480, 640, "PNG"),
         (56, 56, "JPEG"), (224, 336, "PNG")]


def _reference(data: bytes, spec: VisionSpec):
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    out = ref(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
    return out["pixel_values"], tuple(out["image_grid_thw"][0].tolist())


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    for h in (1, 13, 28, 55, 100, 333, 1000, 4000):
        for w in (3, 28, 29, 250, 777, 2000):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((3136, 262144), (3136, 12544), (100_000, 1_000_000)):
                assert smart_resize(h, w, 28, lo, hi) == reference(h, w, 28, lo, hi), (h, w, lo, hi)


def test_dali_matches_transformers_processor():
    images = [make_image(h, w, fmt, seed=i) for i, (h, w, fmt) in enumerate(CASES)]
    ours = ImageProcessor(SPEC, max_batch=4)(images)  # 2 DALI batches
    for (h, w, fmt), data, got in zip(CASES, images, ours):
        ref, grid = _reference(data, SPEC)
        assert got.grid_thw == grid
        assert got.pixel_values.shape == ref.shape
        diff = (got.pixel_values - ref).abs()
        if (h, w) == smart_resize(h, w, 28, SPEC.min_pixels, SPEC.max_pixels):
            # No resampling: only float rounding of the normalisation differs, so the patch
            # layout (merge-window row order, C*T*P*P columns) must match exactly.
            assert diff.max() < 1e-5, (h, w)
        else:
            # DALI's and PIL's bicubic filters round differently; one uint8 level is 1/255/std
            # ~= 0.015 here. Measured on these noisy images: mean <= 0.004, max <= 0.25
            # (a few pixels at sharp stripe edges, ~16 levels). Bounds leave some headroom.
            assert diff.mean() < 0.01, (h, w, float(diff.mean()))
            assert diff.max() < 0.35, (h, w, float(diff.max()))


def test_patch_rows_follow_merge_windows():
    """Row 4k..4k+3 are the 2x2 patches of merged token k; columns are (C, T, P, P)."""
    spec = VisionSpec(min_pixels=56 * 56, max_pixels=56 * 56)
    arr = np.zeros((56, 56, 3), np.uint8)
    arr[:28, 28:] = 255  # top-right 28x28 block white: merged token 1
    from qwen_merge_mcore.testing.media import encode_image

    got = ImageProcessor(spec)([encode_image(arr, "PNG")])[0]
    white = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    per_row = got.pixel_values.view(16, 3, 2, 14, 14)
    for row in range(16):
        expected = white if row // 4 == 1 else -np.array(CLIP_MEAN) / np.array(CLIP_STD)
        assert torch.allclose(per_row[row].mean(dim=(1, 2, 3)), torch.tensor(expected, dtype=torch.float32),
                              atol=1e-4), row


def _raw_frames(data: bytes, dali: bool) -> np.ndarray:
    """Every frame as RGB uint8, decoded the way the processor decodes this codec."""
    if dali:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def graph():
            return fn.decoders.video(fn.external_source(name="d", dtype=types.UINT8), device="cpu")

        pipe = graph()
        pipe.build()
        pipe.feed_input("d", [np.frombuffer(data, np.uint8)])
        return np.array(pipe.run()[0][0])
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("codec,container", [("libvpx-vp9", "webm"), ("libx264", "mp4")])
def test_video_frames_fps_and_layout(codec, container):
    """VP9 decodes in DALI on CPU, H.264 through PyAV. The frames picked, resized with PIL and cut in
    transformers' Qwen2-VL video layout, must equal the processor's output.

    The reference decodes with the same decoder: DALI's and swscale's YUV->RGB conversions differ
    (chroma upsampling), by ~9 uint8 levels on average on these noisy frames.
    """
    from PIL import Image

    spec = VisionSpec(video_fps=2.0, video_max_frames=8, video_max_pixels=112 * 112)
    data = make_video(num_frames=40, height=96, width=128, fps=10, codec=codec, container=container)
    info = probe_video(data)
    plan = plan_video(info, spec)
    assert (info.num_frames, info.fps) == (40, 10.0)
    # 4 s at 2 fps = 8 frames (the cap), 4 temporal patches of 2 frames spanning 1 s each.
    assert len(plan.frames) == 8 and plan.grid_thw[0] == 4
    assert plan.second_per_grid_t == pytest.approx(1.0)
    out = VideoProcessor(spec)(data)
    t, gh, gw = out.grid_thw
    assert out.pixel_values.shape == (t * gh * gw, 3 * 2 * 14 * 14)

    frames = _raw_frames(data, dali=codec == "libvpx-vp9")
    h, w = plan.size
    ref = np.stack([np.asarray(Image.fromarray(frames[i]).resize((w, h), Image.BICUBIC), np.float32)
                    for i in plan.frames]) / 255.0
    ref = (ref - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    ref = ref.transpose(0, 3, 1, 2).reshape(t, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    ref = ref.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * gh * gw, -1)  # transformers' video layout
    diff = (out.pixel_values - torch.from_numpy(ref)).abs()
    # Resampling tolerance as for images (see test_dali_matches_transformers_processor).
    assert diff.mean() < 0.01 and diff.max() < 0.35, (float(diff.mean()), float(diff.max()))


@pytest.mark.parametrize("cut", ["half", "tail", "garbage", "empty"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_or_unreadable_image_is_rejected(fmt, cut):
    data = make_image(64, 80, fmt)
    data = {"half": data[:len(data) // 2], "tail": data[:-3], "garbage": b"not an image" * 20, "empty": b""}[cut]
    with pytest.raises(BadSample) as err:
        image_size(data)
    assert err.value.reason == "bad_image"


def test_decoder_failure_names_the_image_and_recovers():
    """Bytes that pass the header checks but do not decode: the pipeline is rebuilt, the culprit named."""
    good = make_image(64, 80, "JPEG")
    broken = bytearray(good)
    dht = broken.find(b"\xff\xc4")  # Huffman table: PIL skips it when reading the header, libjpeg fails
    broken[dht + 5:dht + 21] = b"\xff" * 16
    assert image_size(bytes(broken)) == (64, 80)
    proc = ImageProcessor(SPEC)
    with pytest.raises(BadSample) as err:
        proc([good, bytes(broken)])
    assert err.value.reason == "bad_image" and err.value.index == 1
    assert proc([good])[0].grid_thw == (1, 4, 6)


@pytest.mark.gpu
def test_gpu_mixed_decode_matches_cpu():
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (its nvImageCodec GPU decoder)")
    images = [make_image(h, w, fmt, seed=i) for i, (h, w, fmt) in enumerate(CASES)]
    cpu = ImageProcessor(SPEC)(images)
    gpu = ImageProcessor(SPEC, device_id=torch.cuda.current_device())(images)
    for a, b in zip(cpu, gpu):
        assert a.grid_thw == b.grid_thw
        # nvJPEG and libjpeg-turbo may differ by an IDCT rounding level (~0.015 after normalising);
        # resize is the same filter on both devices.
        assert (a.pixel_values - b.pixel_values.cpu()).abs().mean() < 0.01


@pytest.mark.gpu
def test_gpu_video_decode_matches_cpu():
    """H.264 decodes on NVDEC (DALI `mixed`) on the GPU, through PyAV on CPU."""
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (its NVDEC video decoder)")
    pytest.importorskip("av", reason="needs PyAV (the CPU reference decode)")
    spec = VisionSpec(video_fps=2.0, video_max_frames=8, video_max_pixels=112 * 112)
    data = make_video(num_frames=40, height=96, width=128, fps=10, codec="libx264", container="mp4")
    cpu = VideoProcessor(spec)(data)
    gpu = VideoProcessor(spec, device_id=torch.cuda.current_device())(data)
    assert cpu.grid_thw == gpu.grid_thw and cpu.second_per_grid_t == gpu.second_per_grid_t
    # NVDEC's and swscale's YUV->RGB conversions differ (~9 uint8 levels on these noisy frames,
    # ~0.13 after normalising); a layout error would be of order 1.
    assert (cpu.pixel_values - gpu.pixel_values.cpu()).abs().mean() < 0.3
