"""Is a torch_dist checkpoint what it claims to be? Checked before anything reads its tensors.

- Files: `convert_manifest.json` (written by `qmm hf2mcore`) lists every file of the checkpoint
  with its size and CRC32 (the `.distcp` shards' computed while they were written).
  `verify_files` recomputes them: a flipped byte is one line naming the file, not garbage weights
  or an unpickling traceback. Checkpoints without a manifest (a training run's) promise nothing.
- Sizes: `verify_sizes` compares each `.distcp` file's length with what `.metadata` says it holds
  (every torch_dist checkpoint, training's included), so a truncated file is named, not an EOFError.
- Config: `check_config` compares the sizes `hf_meta/config.json` sets (hidden size, layers,
  heads, ...) with the shapes of the checkpoint's tensors, so an edited config is refused, naming
  the field, instead of being exported beside weights it does not describe.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from zlib_ng.zlib_ng import crc32

from ..config import ModelConfig
from .mapping import INPUT_NORM
from .safetensors_io import CheckpointError
from .stored import locate

MANIFEST = "convert_manifest.json"
# `crc32` is zlib-ng's: the same CRC32 as zlib's (manifests written with either verify with
# either), computed with carry-less multiplies at tens of GB/s where zlib's table loop does 6:
# the checksums were a fifth of a conversion's CPU time.
# Files are read in chunks of this size: memory stays flat whatever the shard size, and the CRC32
# (GIL released) keeps up with the read, so a check costs about one read of the checkpoint, which
# the load right after finds in the page cache.
CHUNK = 16 << 20


def file_crc32(path: str | Path) -> tuple[int, int]:
    """(size in bytes, CRC32) of a file, streamed in chunks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = crc32(view[:n], crc)
            size += n
    return size, crc


def read_manifest(ckpt_dir: str | Path) -> Optional[dict]:
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def verify_files(ckpt_dir: str | Path, part: tuple[int, int] = (0, 1)) -> list[str]:
    """Problems (one line each, naming the file) with the files the manifest lists; [] when all
    match or there is no manifest. `part=(i, n)` checks every n-th file from the i-th, so that n
    ranks loading one checkpoint share the work. Files are checked on parallel threads."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return []
    files = sorted(manifest.get("files", {}).items())[part[0]::part[1]]

    def check(item) -> Optional[str]:
        name, promised = item
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST})"
        if path.stat().st_size != promised["bytes"]:
            return (f"{path}: {path.stat().st_size} bytes, {MANIFEST} promises {promised['bytes']} (truncated or "
                    "overwritten?)")
        size, crc = file_crc32(path)
        if crc != promised["crc32"]:
            return f"{path}: CRC32 {crc:08x} differs from {promised['crc32']:08x} in {MANIFEST}: the file is corrupt"
        return None

    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1))) as pool:
        return [p for p in pool.map(check, files) if p]


def check_files(ckpt_dir: str | Path) -> None:
    """`verify_files` for one process: raises CheckpointError on the first problems."""
    problems = verify_files(ckpt_dir)
    if problems:
        raise CheckpointError("; ".join(problems))


def verify_files_collective(ckpt_dir: str | Path) -> None:
    """`verify_files` shared by the ranks of the default process group (each checks its share),
    every rank raising the same CheckpointError, so that none waits in a later collective."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return check_files(ckpt_dir)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, verify_files(ckpt_dir, (dist.get_rank(), dist.get_world_size())))
    problems = [p for rank_problems in gathered for p in rank_problems]
    if problems:
        raise CheckpointError("; ".join(problems))


def verify_sizes(ckpt_dir: str | Path) -> None:
    """Every `.distcp` file is as long as the checkpoint's `.metadata` says (the end of its last
    item); a CheckpointError naming the first short or missing file otherwise. A truncated file
    (a full disk, a copy cut short) would fail deep inside the load with a bare EOFError."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir / '.metadata'} is missing: not a complete torch_dist checkpoint") from None
    except Exception as err:  # a cut-short pickle raises EOFError or UnpicklingError
        raise CheckpointError(f"{ckpt_dir / '.metadata'} is damaged ({type(err).__name__}: {err})") from None
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = ckpt_dir / name
        have = path.stat().st_size if path.is_file() else None
        if have is None or have < size:
            state = "missing" if have is None else f"truncated: {have:,} of {size:,} bytes"
            raise CheckpointError(f"{path}: {state} (per {ckpt_dir / '.metadata'})")


# ---------------------------------------------------------------------------------------------
# hf_meta/config.json against the tensors
# ---------------------------------------------------------------------------------------------

def _layer0(metadata: dict, name: str) -> tuple[Optional[tuple[int, ...]], int]:
    """(per-layer shape, number of layers) of table entry `name` (layer 0), per-layer or stacked
    keys; (None, 0) when the checkpoint has no such tensor."""
    try:
        stored = locate(name, metadata)
    except CheckpointError:
        return None, 0
    if stored.layer is not None or ".layers.0." not in name:
        return stored.shape, stored.layers
    layers = 0
    while True:
        try:
            locate(name.replace(".layers.0.", f".layers.{layers}.", 1), metadata)
        except CheckpointError:
            return stored.shape, layers
        layers += 1


def _sizes(cfg: ModelConfig, metadata: dict) -> dict[str, tuple[object, object, str]]:
    """HF config field -> (the config's value, what the tensors show, the tensor that shows it)."""
    out: dict[str, tuple[object, object, str]] = {}

    def shows(field, value, name, read):
        shape, layers = _layer0(metadata, name)
        if shape is not None:
            out[field] = (value, read(shape, layers), f"{name.replace('.layers.0.', '.layers.')} {list(shape)}")
        return out[field][1] if shape is not None else value

    lang, m = cfg.language, "language_model."
    L = m + "decoder.layers.0."
    shows("hidden_size", lang.hidden_size, m + "decoder.final_layernorm.weight", lambda s, n: s[0])
    shows("num_hidden_layers", lang.num_layers, L + "mlp.linear_fc2.weight", lambda s, n: n)
    shows("intermediate_size", lang.ffn_hidden_size, L + "mlp.linear_fc2.weight", lambda s, n: s[1])
    head_dim = lang.head_dim
    if lang.qk_layernorm:
        head_dim = shows("head_dim", lang.head_dim, L + "self_attention.q_layernorm.weight", lambda s, n: s[0])
    # The checkpoint's own head size, so that an edited head_dim is not reported as heads too.
    heads = shows("num_attention_heads", lang.num_attention_heads, L + "self_attention.linear_proj.weight",
                  lambda s, n: s[1] // head_dim)
    shows("num_key_value_heads", lang.num_query_groups, L + "self_attention.linear_qkv.weight",
          lambda s, n: (s[0] // head_dim - heads) // 2)
    # The rows are padded for the TP the checkpoint was written at: any padding of the config's
    # vocabulary agrees.
    rows = _layer0(metadata, m + "embedding.word_embeddings.weight")[0]
    if rows is not None and rows[0] not in {lang.padded_vocab_size(tp) for tp in range(1, 65)}:
        out["vocab_size"] = (lang.vocab_size, f"{rows[0]} rows (not a padding of {lang.vocab_size})",
                             f"{m}embedding.word_embeddings.weight {list(rows)}")
    output = m + "output_layer.weight"
    out["tie_word_embeddings"] = (lang.tie_word_embeddings, output not in metadata,
                                  f"{output} {'absent' if output not in metadata else 'present'}")
    if cfg.has_vision:
        v, V = cfg.vision, "vision_model.decoder.layers.0."
        shows("vision_config.depth", v.depth, V + "mlp.linear_fc2.weight", lambda s, n: n)
        shows("vision_config.hidden_size", v.hidden_size, V + INPUT_NORM, lambda s, n: s[0])
        shows("vision_config.intermediate_size", v.intermediate_size, V + "mlp.linear_fc2.weight", lambda s, n: s[1])
        shows("vision_config.patch_size", v.patch_size, "vision_model.patch_embed.proj.weight",
              lambda s, n: round((s[1] / (v.in_channels * v.temporal_patch_size)) ** 0.5))
        shows("vision_config.out_hidden_size", cfg.projector.merger_out_size, "projector.linear_fc2.weight",
              lambda s, n: s[0])
    return out


def check_config(hf_cfg: dict, cfg: ModelConfig, metadata: dict, config_path: str | Path) -> None:
    """Refuse a config whose sizes disagree with the checkpoint's tensors (`metadata`: from
    `dist_checkpointing.load_tensors_metadata`), naming each field that does."""
    nested = "text_config" in hf_cfg
    wrong = []
    for field, (want, have, where) in _sizes(cfg, metadata).items():
        if want != have:
            name = f"text_config.{field}" if nested and not field.startswith("vision_config.") else field
            have = have if isinstance(have, str) else json.dumps(have)
            wrong.append(f"{name} is {json.dumps(want)}, the tensors say {have} ({where})")
    if wrong:
        raise CheckpointError(f"{config_path} does not describe this checkpoint's weights: " + "; ".join(wrong))
