"""What to merge: a checked, typed description of one `qmm merge` run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("linear", "layerswap", "ties", "dare_ties", "dare_linear")
TASK_VECTOR_METHODS = ("ties", "dare_ties", "dare_linear")
WEIGHT_SUM_METHODS = ("linear", "layerswap")  # weighted sums of whole tensors: weights must sum to 1


@dataclass(frozen=True)
class MergeSpec:
    """`models[0]` is the primary model: its non-language tensors, config and tokenizer are kept.

    weights: one per model. Defaults: linear 1/n each; task-vector methods 1.0 each (plain task
    arithmetic); layerswap (0, 1), i.e. layers outside `layers` come from the second model as they are.
    layers: for layerswap, the layers kept from the first model unchanged.
    include_embeddings: also merge `embed_tokens` and `lm_head` (by default copied from models[0]).
    any_weight_sum: allow linear/layerswap weights that do not sum to 1. Such weights scale every
        merged tensor, norms included (0,0 zeroes the language model; 0.9,0.9 scales norms by 1.8),
        so they are refused unless asked for. Task-vector methods scale deltas and are not checked.
    """

    method: str
    models: tuple[Path, ...]
    base: Path | None = None
    weights: tuple[float, ...] | None = None
    density: float = 0.2
    layers: frozenset[int] = field(default_factory=frozenset)
    seed: int = 0
    include_embeddings: bool = False
    any_weight_sum: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(Path(m) for m in self.models))
        if self.base is not None:
            object.__setattr__(self, "base", Path(self.base))
        if self.method not in METHODS:
            raise ValueError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")
        if len(self.models) < 2:
            raise ValueError(f"merging needs at least two models, got {len(self.models)}")
        if self.method in TASK_VECTOR_METHODS and self.base is None:
            raise ValueError(f"--method {self.method} merges task vectors and needs --base (the common ancestor)")
        if self.method not in TASK_VECTOR_METHODS and self.base is not None:
            raise ValueError(f"--method {self.method} does not use --base; only {', '.join(TASK_VECTOR_METHODS)} do")
        if self.method == "layerswap":
            if len(self.models) != 2:
                raise ValueError("--method layerswap takes exactly two models")
            if not self.layers:
                raise ValueError("--method layerswap needs --layers (the layers kept from the first model)")
        elif self.layers:
            raise ValueError(f"--layers is only used by --method layerswap, not {self.method}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.models):
                raise ValueError(f"{len(self.weights)} weights for {len(self.models)} models; give one per model")
            total = sum(self.weights)
            if self.method in WEIGHT_SUM_METHODS and not self.any_weight_sum and not math.isclose(total, 1.0,
                                                                                                  abs_tol=1e-6):
                raise ValueError(f"--weights {','.join(f'{w:g}' for w in self.weights)} sum to {total:g}, not 1: "
                                 f"--method {self.method} would scale every merged tensor, norms included, by "
                                 f"{total:g}; give weights that sum to 1, or pass --any-weight-sum to scale on purpose")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"--density must be in (0, 1], got {self.density}")

    @property
    def resolved_weights(self) -> tuple[float, ...]:
        if self.weights is not None:
            return self.weights
        n = len(self.models)
        if self.method == "linear":
            return (1.0 / n,) * n
        if self.method == "layerswap":
            return (0.0, 1.0)
        return (1.0,) * n
