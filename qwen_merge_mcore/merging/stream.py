"""Run a merge over Hugging Face folders, one tensor at a time.

For each tensor of the first model: if it is a merged language-model tensor, read the same
tensor from every input (and the base), merge in float32, cast back to the first model's dtype
and write it; otherwise copy the first model's tensor as it is. Memory holds the few tensors of
one step, never a model. Random methods (DARE) draw from a generator seeded by the run seed
and a stable hash of the tensor name and model index, so the result does not depend on the
order tensors are visited in. The output is built in a temporary folder and renamed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..checkpoint.safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from ..utils.atomic import atomic_output_dir
from . import methods
from .names import classify, lm_tensors
from .spec import TASK_VECTOR_METHODS, MergeSpec
from .validate import check_compatible

MERGED_ROLES = ("layer", "final_norm")
EMBEDDING_ROLES = ("embedding", "output")
# Weights and their indexes come from the merge; every other top-level file is copied from models[0].
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")
INFO_NAME = "merge_info.json"


def tensor_seed(seed: int, name: str, model_index: int) -> int:
    """A 63-bit seed from the run seed, the tensor name and the model; stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generators(seed: int, name: str, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(tensor_seed(seed, name, i)) for i in range(n)]


def merge_tensor(spec: MergeSpec, name: str, layer: int | None, inputs: list[torch.Tensor],
                 base: torch.Tensor | None) -> torch.Tensor:
    """The merged value of one language-model tensor (float32), from each model's copy of it."""
    weights = spec.resolved_weights
    xs = [t.float() for t in inputs]
    if spec.method == "linear":
        return methods.linear(xs, weights)
    if spec.method == "layerswap":
        if layer is not None and layer in spec.layers:
            return xs[0]
        return methods.linear(xs, weights)
    assert base is not None
    b = base.float()
    deltas = [x - b for x in xs]
    if spec.method == "ties":
        return b + methods.ties(deltas, weights, spec.density)
    gens = _generators(spec.seed, name, len(xs))
    if spec.method == "dare_linear":
        return b + methods.dare_linear(deltas, weights, spec.density, gens)
    return b + methods.dare_ties(deltas, weights, spec.density, gens)


def merge_folders(spec: MergeSpec, out: str | Path, overwrite: bool = False, max_shard_bytes: int = 5 * 10**9,
                  progress: bool = True) -> Path:
    """Merge `spec.models` into a complete Hugging Face folder at `out`; returns `out`."""
    from tqdm import tqdm

    out = Path(out).absolute()
    folders = list(spec.models) + ([spec.base] if spec.base is not None else [])
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader(f)) for f in folders]
        lm_maps = [lm_tensors(r.names) for r in readers]
        roles = MERGED_ROLES + (EMBEDDING_ROLES if spec.include_embeddings else ())
        merged = {classify(n).key: n for n in lm_maps[0].values() if classify(n).role in roles}
        check_compatible(folders, readers, lm_maps, set(merged))
        if spec.method == "layerswap":
            _check_layers(spec, lm_maps[0])

        primary = readers[0]
        plan = [primary.spec(n) for n in primary.names]
        n_models = len(spec.models)
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            _copy_side_files(spec.models[0], tmp)
            with ShardedSafetensorsWriter(tmp, plan, max_shard_bytes) as writer:
                for s in tqdm(plan, desc=f"merge ({spec.method})", unit="tensor", disable=not progress):
                    info = classify(s.name)
                    if info is None or info.key not in merged:
                        writer.write(s.name, primary.get(s.name))
                        continue
                    inputs = [readers[i].get(lm_maps[i][info.key]) for i in range(n_models)]
                    base = readers[-1].get(lm_maps[-1][info.key]) if spec.method in TASK_VECTOR_METHODS else None
                    writer.write(s.name, merge_tensor(spec, s.name, info.layer, inputs, base).to(s.dtype))
                    del inputs, base
            (tmp / INFO_NAME).write_text(json.dumps(_info(spec, sorted(merged.values())), indent=2) + "\n")
    return out


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
