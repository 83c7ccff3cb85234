"""ViT feature cache for a frozen ViT (`data.vision_cache: DIR`).

The ViT output of each image ([patches, vision hidden], in the ViT's output dtype, before the
projector, which trains) is stored once and read on later visits instead of decoding and
encoding the image. The folder belongs to one identity, written to `manifest.json` by the first
run: the preprocessing settings (pixel budgets, patch/merge sizes, CLIP statistics, output
dtype) and a hash of the ViT weights. A run with another identity is refused with one line;
entries are keyed by the SHA-256 of the image file's bytes.

Entries are written in shards (`<run>-dp<rank>-<n>.safetensors`, one tensor per image), each
to a temporary name and renamed when complete, by tensor-parallel rank 0 of each data-parallel
group. Which images hit must be the same on every TP rank (they run the ViT together), so a hit
is: in a shard present when the cache opened (all ranks open it before training, then meet at a
barrier), or put by this rank in this run; the other TP ranks record the same puts and name the
same shards, without writing. Entries written by other data-parallel ranks in this run become
visible to the next run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..utils.atomic import OutputPathError, atomic_write_file, atomic_write_text
from .vision import CLIP_MEAN, CLIP_STD, VisionSpec

VERSION = 1
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^run(\d+)-dp(\d+)-(\d+)\.safetensors$")


class VisionCacheError(ValueError):
    """A cache folder that this run cannot use (one line: the folder and why)."""


@dataclass(frozen=True)
class CacheIdentity:
    """What the cached features depend on besides the image bytes."""

    preprocessing: dict
    vit_weights: str  # hex digest (see `vit_weights_hash`)

    def as_dict(self) -> dict:
        return {"version": VERSION, **asdict(self)}


def preprocessing_settings(spec: VisionSpec, dtype: torch.dtype) -> dict:
    """The settings that change the ViT's input or output for the same image bytes."""
    return {"patch_size": spec.patch_size, "temporal_patch_size": spec.temporal_patch_size,
            "merge_size": spec.merge_size, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels,
            "clip_mean": list(CLIP_MEAN), "clip_std": list(CLIP_STD), "dtype": str(dtype).removeprefix("torch.")}


def vit_weights_hash(vision_model: torch.nn.Module) -> str:
    """SHA-256 over this rank's ViT tensors in Megatron's checkpoint naming (backend-independent),
    with each tensor's global shape and offset; for a ViT split over TP, over the digests of all TP
    ranks. A replicated ViT and a ViT at TP=1 hold whole tensors, so they agree at any TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    digest = hashlib.sha256()
    items = [v for v in nested_values(vision_model.sharded_state_dict())
             if isinstance(v, (ShardedTensor, ShardedTensorFactory))]
    for item in sorted(items, key=lambda v: v.key):
        digest.update(item.key.encode())
        if isinstance(item, ShardedTensor):
            digest.update(repr((item.global_shape, item.global_offset)).encode())
        data = item.data.detach().cpu().contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    tp = parallel_state.get_tensor_model_parallel_world_size() if dist.is_initialized() else 1
    if tp == 1 or getattr(vision_model, "replicated", False):
        return digest.hexdigest()
    digests: list = [None] * tp
    dist.all_gather_object(digests, digest.hexdigest(), group=parallel_state.get_tensor_model_parallel_group())
    return hashlib.sha256(f"tp{tp}:{','.join(digests)}".encode()).hexdigest()


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class VisionFeatureCache:
    """`key in cache`, `cache.get(key)`, `cache.put(key, features)`, `cache.close()`."""

    def __init__(self, root: str | Path, identity: CacheIdentity, dp_rank: int = 0, writer: bool = True,
                 shard_images: int = 64):
        self.root, self.identity = Path(root), identity
        self.dp_rank, self.writer, self.shard_images = dp_rank, writer, shard_images
        self._check_manifest()
        self.index: dict[str, Path] = {}
        runs = [0]
        for path in sorted(self.root.iterdir()):
            match = _SHARD.match(path.name)
            if match:
                runs.append(int(match.group(1)))
                self.index.update(dict.fromkeys(_shard_keys(path), path))
        self.run = max(runs) + 1  # the same on every rank: all open before anyone writes
        self.pending: dict[str, torch.Tensor] = {}
        self.shards_written = 0
        self._open: dict[Path, object] = {}
        self.hits = self.misses = 0

    def _check_manifest(self) -> None:
        path = self.root / MANIFEST
        want = self.identity.as_dict()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                atomic_write_text(path, json.dumps(want, indent=2) + "\n")  # same text from every rank
            have = json.loads(path.read_text())
        except (OSError, OutputPathError) as err:
            raise VisionCacheError(f"data.vision_cache {self.root}: cannot use the folder: {err}") from None
        except json.JSONDecodeError:
            raise VisionCacheError(f"data.vision_cache {self.root}: {MANIFEST} is not JSON") from None
        if have.get("vit_weights") != want["vit_weights"]:
            built = str(have.get("vit_weights"))[:12]
            raise VisionCacheError(
                f"data.vision_cache {self.root}: built for other ViT weights (hash {built}, this model "
                f"{want['vit_weights'][:12]}); use another folder or the ViT it was built with")
        if have != want:
            diff = sorted(k for k in set(have.get("preprocessing", {})) | set(want["preprocessing"])
                          if have.get("preprocessing", {}).get(k) != want["preprocessing"].get(k))
            raise VisionCacheError(f"data.vision_cache {self.root}: built with other preprocessing settings "
                                   f"({', '.join(diff) or 'version'} differ); use another folder")

    def __contains__(self, key: str) -> bool:
        return key in self.pending or key in self.index

    def get(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending[key]
        path = self.index[key]
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(key)

    def lookup(self, keys: list[str]) -> list[Optional[torch.Tensor]]:
        """Features per key, None for a miss (counted)."""
        found = [self.get(k) if k in self else None for k in keys]
        self.hits += sum(f is not None for f in found)
        self.misses += sum(f is None for f in found)
        return found

    def put(self, key: str, features: torch.Tensor) -> None:
        if key in self:
            return
        self.pending[key] = features.detach().to("cpu", copy=True).contiguous()
        if len(self.pending) >= self.shard_images:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard (TP rank 0); every rank then reads them from it."""
        if not self.pending:
            return
        path = self.root / f"run{self.run}-dp{self.dp_rank}-{self.shards_written:06d}.safetensors"
        if self.writer:
            from safetensors.torch import save_file

            try:
                atomic_write_file(path, lambda tmp: save_file(self.pending, str(tmp)))
            except OutputPathError as err:
                raise VisionCacheError(f"data.vision_cache {self.root}: {err}") from None
        self.index.update(dict.fromkeys(self.pending, path))
        self.pending, self.shards_written = {}, self.shards_written + 1

    def close(self) -> None:
        self.flush()
        self._open.clear()


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def open_for_training(cfg, chunks: list) -> Optional[VisionFeatureCache]:
    """The run's cache (None without `data.vision_cache` or without a ViT on this pipeline stage),
    attached to the first-stage model chunk, which fills it; collective (a barrier after opening)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..models.qwen_merge import _unwrap as unwrap
    from ..models.qwen_merge import part_modules

    if cfg.data.vision_cache is None:
        return None
    cache, error = None, None
    vision = part_modules(chunks[0])["vision"]
    if vision is not None:
        dtype = next(vision.parameters()).dtype
        identity = CacheIdentity(preprocessing_settings(VisionSpec.from_configs(cfg.data, cfg.model), dtype),
                                 vit_weights_hash(vision))
        try:
            cache = VisionFeatureCache(cfg.data.vision_cache, identity, parallel_state.get_data_parallel_rank(),
                                       writer=parallel_state.get_tensor_model_parallel_rank() == 0)
        except VisionCacheError as err:
            error = err
        else:
            unwrap(chunks[0]).vision_cache = cache
    if dist.is_initialized():
        # Every rank learns of a refusal (stages without a ViT would otherwise wait forever); this
        # collective is also the barrier that orders all opens before any write.
        failed = torch.tensor([error is not None], dtype=torch.int32,
                              device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(failed)
        if error is None and int(failed):
            error = VisionCacheError(f"data.vision_cache {cfg.data.vision_cache}: refused on another rank (see its "
                                     "error)")
    if error is not None:
        raise error
    return cache
