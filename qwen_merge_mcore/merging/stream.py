"""Run a merge over Hugging Face folders, one tensor (and one slice of rows) at a time.

For each tensor of the first model: if it is a merged language-model tensor, read the same rows
from every input (and the base), merge them in float32, cast back to the first model's dtype and
write them; otherwise copy the first model's tensor through. Tensors are processed in slices of
rows, so memory holds a few slices, never a model and not even a whole large tensor (TIES finds
its whole-tensor magnitude cut from two extra histogram passes over the slices).

Random methods (DARE) draw from one generator per tensor and model, seeded by the run seed and a
stable hash of the tensor name, so results do not depend on the order tensors are visited in.
The output is built in a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import SafetensorsFolder, ShardedSafetensorsWriter
from ..utils.atomic import atomic_output_dir, check_output_not_input
from . import methods
from .names import classify, lm_tensors
from .spec import TASK_VECTOR_METHODS, MergeSpec
from .validate import check_compatible

MERGED_ROLES = ("layer", "final_norm")
EMBEDDING_ROLES = ("embedding", "output")
DARE_METHODS = ("dare_linear", "dare_ties")
# Weights and their indexes come from the merge; every other top-level file is copied from models[0].
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")
INFO_NAME = "merge_info.json"
# Slices of about 1M elements: 4 MB per float32 operand, about a dozen operands at once.
CHUNK_ELEMENTS = 1 << 20


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A 63-bit seed from the run seed, the tensor name and the model; stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generators(seed: int, name: str, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(tensor_seed(seed, name, i)) for i in range(n)]


def row_chunks(shape: tuple[int, ...], chunk_elements: int = CHUNK_ELEMENTS) -> list[slice | None]:
    """Row ranges of about chunk_elements each; [None] (the whole tensor) for scalars and empty tensors."""
    if not shape or shape[0] == 0:
        return [None]
    rows = max(1, chunk_elements // max(1, math.prod(shape[1:])))
    return [slice(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def merge_chunk(spec: MergeSpec, layer: int | None, inputs: list[torch.Tensor], base: torch.Tensor | None,
                thresholds: list[float | None] | None, generators: list[torch.Generator] | None) -> torch.Tensor:
    """The merged value (float32) of matching slices of one language-model tensor.

    thresholds: the TIES magnitude cut of each model's task vector, over the whole tensor.
    generators: the DARE generator of each model, consumed slice after slice in row order.
    """
    weights = spec.resolved_weights
    xs = [t.float() for t in inputs]
    if spec.method == "layerswap" and layer is not None and layer in spec.layers:
        return xs[0]
    if spec.method in ("linear", "layerswap"):
        return methods.linear(xs, weights)
    b = base.float()
    deltas = [x - b for x in xs]
    if spec.method == "ties":
        return b + methods.elect_and_average([methods.trim_at(d, t) for d, t in zip(deltas, thresholds)], weights)
    if spec.method == "dare_linear":
        return b + methods.dare_linear(deltas, weights, spec.density, generators)
    return b + methods.dare_ties(deltas, weights, spec.density, generators)


def merge_tensor(spec: MergeSpec, name: str, layer: int | None, inputs: list[torch.Tensor],
                 base: torch.Tensor | None) -> torch.Tensor:
    """A whole tensor merged in one piece: the reference that the sliced, streamed merge equals."""
    thresholds = generators = None
    if spec.method == "ties":
        thresholds = [methods.magnitude_threshold((x.float() - base.float()).abs(), spec.density) for x in inputs]
    if spec.method in DARE_METHODS:
        generators = _generators(spec.seed, name, len(inputs))
    return merge_chunk(spec, layer, inputs, base, thresholds, generators)


class _Sources:
    """Matching row slices of one language-model tensor from every model (and the base)."""

    def __init__(self, readers: list[SafetensorsFolder], lm_maps: list[dict[str, str]], key: str, n_models: int,
                 with_base: bool):
        self._models = [(r, m[key]) for r, m in zip(readers[:n_models], lm_maps)]
        self._base = (readers[-1], lm_maps[-1][key]) if with_base else None

    def read(self, rows: slice | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        base = self._base[0].get(self._base[1], rows) if self._base else None
        return [r.get(name, rows) for r, name in self._models], base

    def ties_thresholds(self, shape: tuple[int, ...], chunks: list, density: float) -> list[float | None]:
        """Each model's magnitude cut over its whole task vector, computed slice by slice."""
        base_reader, base_name = self._base

        def magnitudes(reader, name):
            return lambda: ((reader.get(name, rows).float() - base_reader.get(base_name, rows).float()).abs()
                            for rows in chunks)

        return [methods.magnitude_threshold_sliced(magnitudes(r, n), math.prod(shape), density)
                for r, n in self._models]


def merge_folders(spec: MergeSpec, out: str | Path, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                  progress: bool = True, chunk_elements: int = CHUNK_ELEMENTS) -> Path:
    """Merge `spec.models` into a complete Hugging Face folder at `out`; returns `out`.

    chunk_elements: slice size in elements. DARE masks are drawn slice after slice, so for a given
    seed they also depend on it; it is fixed for the CLI.
    """
    from tqdm import tqdm

    out = Path(out).absolute()
    folders = list(spec.models) + ([spec.base] if spec.base is not None else [])
    check_output_not_input(out, folders)
    readers = [SafetensorsFolder(f) for f in folders]
    lm_maps = [lm_tensors(r.names()) for r in readers]
    roles = MERGED_ROLES + (EMBEDDING_ROLES if spec.include_embeddings else ())
    merged = {classify(n).key: n for n in lm_maps[0].values() if classify(n).role in roles}
    check_compatible(folders, readers, lm_maps, set(merged))
    if spec.method == "layerswap":
        _check_layers(spec, lm_maps[0])

    primary = readers[0]
    plan = [primary.spec(n) for n in primary.names()]
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        _copy_side_files(spec.models[0], tmp)
        writer = ShardedSafetensorsWriter(tmp, plan, max_shard_bytes)
        for s in tqdm(plan, desc=f"merge ({spec.method})", unit="tensor", disable=not progress):
            info = classify(s.name)
            chunks = row_chunks(s.shape, chunk_elements)
            if info is None or info.key not in merged:  # copied through unchanged
                for rows in chunks:
                    _write(writer, s.name, primary.get(s.name, rows), rows)
                continue
            n = len(spec.models)
            sources = _Sources(readers, lm_maps, info.key, n, spec.method in TASK_VECTOR_METHODS)
            ties = spec.method == "ties"
            thresholds = sources.ties_thresholds(s.shape, chunks, spec.density) if ties else None
            generators = _generators(spec.seed, s.name, n) if spec.method in DARE_METHODS else None
            for rows in chunks:
                inputs, base = sources.read(rows)
                value = merge_chunk(spec, info.layer, inputs, base, thresholds, generators)
                _write(writer, s.name, value.to(s.dtype), rows)
        writer.close()
        (tmp / INFO_NAME).write_text(json.dumps(_info(spec, sorted(merged.values())), indent=2) + "\n")
    return out


def _write(writer: ShardedSafetensorsWriter, name: str, value: torch.Tensor, rows: slice | None) -> None:
    if rows is None:
        writer.write(name, value)
    else:
        writer.write_rows(name, value, rows.start)


def _check_layers(spec: MergeSpec, lm_map: dict[str, str]) -> None:
    present = {classify(n).layer for n in lm_map.values()} - {None}
    unknown = sorted(spec.layers - present)
    if unknown:
        raise ValueError(f"--layers names layers {unknown} but the models have layers 0-{max(present)}")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config, tokenizer, chat template, processor configs, remote code: as they are."""
    for p in sorted(Path(src).iterdir()):
        if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != INFO_NAME:
            shutil.copy2(p, dst / p.name)


def _info(spec: MergeSpec, merged_names: list[str]) -> dict:
    return {
        "method": spec.method,
        "models": [str(m) for m in spec.models],
        "base": str(spec.base) if spec.base else None,
        "weights": list(spec.resolved_weights),
        "density": spec.density if spec.method in TASK_VECTOR_METHODS else None,
        "layers_from_first_model": sorted(spec.layers) if spec.method == "layerswap" else None,
        "seed": spec.seed,
        "include_embeddings": spec.include_embeddings,
        "merged_tensors": len(merged_names),
        "note": "tensors not counted in merged_tensors are copied unchanged from models[0]",
    }
