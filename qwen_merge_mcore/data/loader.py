"""The training iterator: mix -> read -> template -> pack -> DALI preprocessing -> `Batch`.

A step takes the next `step_samples` samples of the current pass over the mix (see mixture.py;
the last step of a pass takes what is left). Every data-parallel rank prepares all of them (rows
parsed, media headers read, tokenised, MRoPE positions computed) and computes the same assignment
to DP x M micro-batches (packing.py), so all ranks agree on M without communicating; each then
emits its own M micro-batches, one per `__next__`, decoding images only then. The state is the
sample position (pass, first sample of the step) and the micro-batches emitted: a step is rebuilt
deterministically on resume, so a resumed run continues with the next unseen sample, at any DP.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from ..batch import Batch, VisionInput
from ..positions import mrope_position_ids
from .errors import BadSample, BadSampleCounter, log
from .formats import row_label, to_sample
from .mixture import Mixture
from .packing import PackedSample, assign_micro_batches, collate_packed, sample_flops
from .readers import dataset_files, open_rows
from .template import ChatEncoder
from .video import VideoProcessor, plan_video, probe_video
from .vision import ImageProcessor, VisionSpec, image_size

STATE_VERSION = 2


class KeptSamples(Protocol):
    """How the pipeline stages reading one stream agree on each bin's samples when only the
    first decodes media: per sample of the bin, None (kept) or the reason it was dropped."""

    def publish(self, dropped: list[Optional[str]]) -> None: ...  # the decoding stage

    def receive(self, count: int) -> list[Optional[str]]: ...  # the stages that do not decode


@dataclass
class _Dataset:
    name: str
    rows: object
    fmt: str
    data_root: str


class TrainIterator:
    """`next_step() -> M` opens the next step (this rank's M micro-batches, the same M on every
    rank); `next(it) -> Batch` (one packed sequence) gives them in turn and opens the next step by
    itself at the end of one; `state_dict()` / `load_state_dict()` for checkpoints; `len()`: steps
    per pass. Infinite: after the last step of a pass the next pass starts in a new order.
    """

    def __init__(self, data_cfg, model_cfg, tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 micro_batch_tokens: Optional[int] = None, seed: int = 0, device_id: Optional[int] = None,
                 step_samples: int = 512, pad_to_full: bool = False, decode_media: bool = True,
                 kept_samples: Optional["KeptSamples"] = None, microbatch_multiple: int = 1,
                 freeze: Sequence[str] = ("vision",), vision_cache=None):
        if not data_cfg.datasets:
            raise ValueError("data.datasets is empty")
        if not decode_media and kept_samples is None:
            raise ValueError("decode_media=False needs kept_samples: the decoding stage's dropped samples")
        self.decode_media, self.kept_samples = decode_media, kept_samples
        self.vision_cache = vision_cache  # data/vision_cache.py: images found there are not decoded
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.cfg, self.model_cfg = data_cfg, model_cfg
        if step_samples <= 0:
            raise ValueError(f"step_samples must be > 0, got {step_samples}")
        self.dp_rank, self.dp_size, self.seed, self.step_samples = dp_rank, dp_size, seed, step_samples
        self.microbatch_multiple = microbatch_multiple  # M is a multiple of it (PP, for interleaving)
        self.freeze = tuple(freeze)  # for the FLOP cost of a sample (flop_balanced packing)
        tokens = micro_batch_tokens or data_cfg.seq_length
        if tokens > data_cfg.seq_length:
            raise ValueError(f"micro_batch_tokens {tokens} exceeds data.seq_length {data_cfg.seq_length}")
        mult = data_cfg.pad_to_multiple_of
        # Bins hold at most this many tokens, so that padding never crosses the limit.
        self.capacity = tokens - tokens % mult if tokens >= mult else tokens
        self.pad_to = self.capacity if pad_to_full else None
        self.spec = VisionSpec.from_configs(data_cfg, model_cfg)
        self.encoder = ChatEncoder(tokenizer, data_cfg.template, model_cfg.image_token_id, model_cfg.video_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.datasets = [self._open(i, ds) for i, ds in enumerate(data_cfg.datasets)]
        self.mixture = Mixture([len(d.rows) for d in self.datasets], [ds.epochs for ds in data_cfg.datasets],
                               [ds.weight for ds in data_cfg.datasets], seed, data_cfg.shuffle)
        if len(self.mixture) == 0:
            raise ValueError("the data mix has no samples")
        threads = max(1, data_cfg.num_workers)  # DALI's CPU worker threads
        if decode_media:
            self.images = ImageProcessor(self.spec, device_id, num_threads=threads)
            self.videos = VideoProcessor(self.spec, device_id, num_threads=threads)
        self.bad = BadSampleCounter(data_cfg.max_bad_fraction)
        self.pass_index, self.offset, self.done = 0, 0, 0  # the step's first sample; micro-batches emitted
        self._order: Optional[np.ndarray] = None
        self._step: Optional[list[list[PackedSample]]] = None  # this rank's micro-batches of the step
        self.last_row_ids: list[str] = []  # the samples of the batch last returned (for logs)

    @staticmethod
    def _open(i: int, ds) -> _Dataset:
        files = dataset_files(ds.path)
        root = ds.data_root or (ds.path if os.path.isdir(ds.path) else os.path.dirname(files[0]))
        name = ds.name or os.path.splitext(os.path.basename(ds.path.rstrip("/")))[0] or f"dataset{i}"
        return _Dataset(name, open_rows(ds.path), ds.format, root)

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __len__(self) -> int:
        return -(-len(self.mixture) // self.step_samples)

    def next_step(self) -> int:
        """Open the next step (unless one is open and untouched, as after a resume); -> its M."""
        if self._step is not None and self.done == 0:
            return len(self._step)
        if self._step is not None:
            if self.done < len(self._step):
                raise RuntimeError(f"next_step() after {self.done} of the step's {len(self._step)} micro-batches")
            self._advance()
        self._step = self._build_step()
        return len(self._step)

    def __next__(self) -> Batch:
        if self._step is None or self.done == len(self._step):
            self.next_step()
        samples = self._step[self.done]
        self.done += 1
        return self._collate(samples)

    def _advance(self) -> None:
        self._step, self.done = None, 0
        self.offset += self.step_samples
        if self.offset >= len(self.mixture):
            self.pass_index, self.offset, self._order = self.pass_index + 1, 0, None

    def _build_step(self) -> list[list[PackedSample]]:
        for _ in range(len(self) + 1):
            if self._order is None:
                self._order = self.mixture.order(self.pass_index)
            entries = self._order[self.offset:self.offset + self.step_samples].tolist()
            prepared = [s for s in (self._prepare(d, r) for d, r in entries) if s is not None]
            if prepared:
                costs = ([sample_flops(self.model_cfg, len(s), s.image_grids + s.video_grids, self.freeze)
                          for s in prepared] if self.cfg.packing == "flop_balanced" else None)
                plan = assign_micro_batches([len(s) for s in prepared], self.capacity, self.dp_size, self.cfg.packing,
                                            self.microbatch_multiple, costs)
                return [[prepared[i] for i in slot] for slot in plan[self.dp_rank]]
            self._advance()
        raise ValueError(f"a whole pass over the data mix gave no usable sample ({len(self.mixture)} samples; "
                         f"bad: {dict(self.bad.counts)})")

    # -- one sample ---------------------------------------------------------------------------
    def _prepare(self, ds_index: int, row_index: int) -> Optional[PackedSample]:
        ds = self.datasets[ds_index]
        row_id = base_id = f"{ds.name}:{row_index}"
        try:
            row = ds.rows[row_index]
            row_id = row_label(row, base_id)
            sample = to_sample(row, ds.fmt, base_id, ds.data_root)
            images = [_read_media(m, "image") for m in sample.images]
            grids = [self.spec.image_grid(*image_size(data)) for data in images]
            videos = [_read_media(m, "video") for m in sample.videos]
            plans = [plan_video(probe_video(data), self.spec) for data in videos]
            vgrids = [p.grid_thw for p in plans]
            enc = self.encoder.encode(sample, [self.spec.merged_tokens(g) for g in grids],
                                      [self.spec.merged_tokens(g) for g in vgrids])
            if len(enc.input_ids) > self.capacity:
                raise BadSample("too_long", f"{len(enc.input_ids)} tokens exceed the sequence length {self.capacity}")
            positions = self._positions(enc.input_ids, grids, vgrids, [p.second_per_grid_t for p in plans])
        except BadSample as err:
            self.bad.skip(row_id, err)
            return None
        self.bad.ok()
        return PackedSample(row_id, enc.input_ids, enc.target_mask, positions, images, grids, videos, vgrids)

    def _positions(self, ids, grids, vgrids, seconds) -> torch.Tensor:
        m = self.model_cfg
        try:
            return mrope_position_ids(
                torch.tensor(ids), torch.tensor(grids).reshape(-1, 3), torch.tensor(vgrids).reshape(-1, 3),
                seconds, image_token_id=m.image_token_id, video_token_id=m.video_token_id,
                spatial_merge_size=m.vision.spatial_merge_size, tokens_per_second=m.vision.tokens_per_second)
        except ValueError as err:
            raise BadSample("image_token_mismatch", str(err)) from None

    # -- one packed sequence ------------------------------------------------------------------
    def _collate(self, samples: list[PackedSample]) -> Batch:
        """Decode the bin's media (all its images in one DALI batch); a sample whose media fail is
        dropped from the bin and counted. Without `decode_media` (pipeline stages after the first
        never see pixels) the bin drops what the decoding stage dropped, as `kept_samples` tells,
        so that every stage packs the same sequence."""
        if not self.decode_media:
            reasons = self.kept_samples.receive(len(samples))
            for s, reason in zip(samples, reasons):
                if reason is not None:
                    self.bad.skip(s.row_id, BadSample(reason, "its media failed on the decoding pipeline stage"),
                                  already_seen=True)
            return self._pack([s for s, reason in zip(samples, reasons) if reason is None], None, None)
        kept = list(samples)
        dropped: dict[int, tuple[str, BadSample]] = {}  # id(sample) -> (row id, why), in the order found
        while True:
            owner = [k for k, s in enumerate(kept) for _ in s.images]
            try:
                done = self._decode_images([img for s in kept for img in s.images]) if owner else []
                break
            except BadSample as err:
                bad = kept.pop(owner[err.index] if err.index is not None else 0)
                dropped[id(bad)] = (bad.row_id, err)
        pixels, grids, vpixels, vgrids, usable = [], [], [], [], []
        for k, s in enumerate(kept):
            mine = [d for d, o in zip(done, owner) if o == k]
            try:
                if [d.grid_thw for d in mine] != s.image_grids:
                    raise BadSample("bad_image", f"decoded grids {[d.grid_thw for d in mine]} differ from the "
                                    f"header grids {s.image_grids}")
                vids = [self.videos(v) for v in s.videos]
            except BadSample as err:
                dropped[id(s)] = (s.row_id, err)
                continue
            usable.append(s)
            pixels += mine
            grids += s.image_grids
            vpixels += [v.pixel_values for v in vids]
            vgrids += [v.grid_thw for v in vids]
        if self.kept_samples is not None:  # before counting, which may stop the run
            self.kept_samples.publish([dropped[id(s)][1].reason if id(s) in dropped else None for s in samples])
        for row_id, err in dropped.values():
            self.bad.skip(row_id, err, already_seen=True)
        return self._pack(usable, self._image_input(pixels, grids), _vision(vpixels, vgrids))

    def _decode_images(self, images: list[bytes]) -> list:
        """DALI-processed images, or `_Cached` entries for images in the ViT feature cache."""
        if self.vision_cache is None:
            return self.images(images)
        from .vision_cache import image_key

        keys = [image_key(data) for data in images]
        found = self.vision_cache.lookup(keys)
        todo = [i for i, f in enumerate(found) if f is None]
        try:
            decoded = iter(self.images([images[i] for i in todo]) if todo else ())
        except BadSample as err:
            if err.index is not None:  # a position among the decoded images -> among all
                err.index = todo[err.index]
            raise
        return [_Cached(key, f, self.spec.image_grid(*image_size(data))) if f is not None
                else dataclasses.replace(next(decoded), key=key) for key, f, data in zip(keys, found, images)]

    def _image_input(self, images: list, grids: list) -> Optional[VisionInput]:
        """The ViT input of the bin's images (`ProcessedImage` or `_Cached` entries)."""
        if self.vision_cache is None or not images:
            return _vision([d.pixel_values for d in images], grids)
        cached = [isinstance(d, _Cached) for d in images]
        decoded = [d.pixel_values for d in images if not isinstance(d, _Cached)]
        features = [d.features for d in images if isinstance(d, _Cached)]
        width = 3 * self.spec.temporal_patch_size * self.spec.patch_size ** 2
        return VisionInput(torch.cat(decoded) if decoded else torch.zeros(0, width),
                           torch.tensor(grids, dtype=torch.long), tuple(d.key for d in images),
                           torch.tensor(cached), torch.cat(features) if features else None)

    def _pack(self, usable: list[PackedSample], images, videos) -> Batch:
        """An empty slot (too few samples in the step, or all of the bin's media failed) becomes a
        padding-only micro-batch with no loss tokens: every rank still runs its M micro-batches."""
        self.last_row_ids = [s.row_id for s in usable]
        return collate_packed(usable, self.pad_id, self.cfg.pad_to_multiple_of, self.pad_to, images, videos)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sample position: a finished step is recorded as the start of the next one."""
        pass_index, offset, done = self.pass_index, self.offset, self.done
        if self._step is not None and done == len(self._step):
            offset, done = offset + self.step_samples, 0
            if offset >= len(self.mixture):
                pass_index, offset = pass_index + 1, 0
        return {"version": STATE_VERSION, "seed": self.seed, "step_samples": self.step_samples,
                "dp_size": self.dp_size, "packing": self.cfg.packing, "pass_index": pass_index, "offset": offset,
                "done": done, "bad": self.bad.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} != {STATE_VERSION}")
        if state["seed"] != self.seed:
            log.warning("data state from seed %s, this run has seed %s: resuming at the same sample position of "
                        "another order", state["seed"], self.seed)
        self.pass_index, self.offset = state["pass_index"], state["offset"]
        # Within a step, the micro-batches emitted depend on the step's size, DP and packing.
        same = all(state[k] == v for k, v in (("step_samples", self.step_samples), ("dp_size", self.dp_size),
                                               ("packing", self.cfg.packing)))
        self.done = state["done"] if same else 0
        if state["done"] and not same:
            log.warning("data state saved mid-step with another step size, DP or packing: repeating the step "
                        "from its first sample")
        self.bad.load_state_dict(state["bad"])
        self._order, self._step = None, None
        if self.done:
            self._step = self._build_step()


def _read_media(media, kind: str) -> bytes:
    if isinstance(media, bytes):
        return media
    try:
        with open(media, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample("missing_file", f"{kind} {media} does not exist") from None
    except OSError as err:
        raise BadSample("missing_file", f"{kind} {media} cannot be read: {err}") from None


@dataclass
class _Cached:
    """An image found in the ViT feature cache, standing in for its decoded pixels."""

    key: str
    features: torch.Tensor
    grid_thw: tuple


def _vision(pixels: list[torch.Tensor], grids: list) -> Optional[VisionInput]:
    if not pixels:
        return None
    return VisionInput(torch.cat(pixels), torch.tensor(grids, dtype=torch.long))


def build_train_iterator(data_cfg, model_cfg, tokenizer_dir, dp_rank: int = 0, dp_size: int = 1,
                         micro_batch_tokens: Optional[int] = None, seed: int = 0,
                         device_id: Optional[int] = None, **kwargs) -> TrainIterator:
    """The training loop's entry point. `tokenizer_dir`: a folder with the tokenizer (or a tokenizer)."""
    tokenizer = tokenizer_dir
    if isinstance(tokenizer_dir, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return TrainIterator(data_cfg, model_cfg, tokenizer, dp_rank, dp_size, micro_batch_tokens, seed, device_id,
                         **kwargs)
