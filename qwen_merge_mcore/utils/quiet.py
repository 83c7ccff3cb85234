"""Third-party warnings known to be harmless here: filtered once, at the start of a command.

Megatron-Core warns at import, in every process, that Transformer Engine and Apex are missing,
and torch's checkpointing warns about APIs Megatron-Core still uses: dozens of lines per rank
before a command's first line of its own. `install()` hides exactly these (matched by the start
of their text and their category, nothing broader), in this process and, through
PYTHONWARNINGS, in the processes it starts; the first hidden note about a missing package is
replaced by one line on rank 0 saying what is missing and what it costs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    message: str  # how the warning's text starts
    category: type[Warning]
    about_missing_packages: bool = False  # summarised by `missing_packages_line()`
    cpu_only: bool = False  # meaningful advice on GPUs: hidden only where CUDA is absent


KNOWN = (
    Known("Transformer Engine and Apex are not installed", UserWarning, about_missing_packages=True),
    Known("Apex is not installed", UserWarning, about_missing_packages=True),
    # Megatron-Core 0.16 warns about its own default of TransformerConfig.cuda_graph_scope.
    Known("full scope is deprecated", UserWarning),
    # torch.distributed.checkpoint about ShardedTensor and load_state_dict, which Megatron-Core's
    # torch_dist format still uses.
    Known("Please use DTensor instead", FutureWarning),
    Known("`load_state_dict` is deprecated", FutureWarning),
    # A GPU tuning hint (slurm/common.sh sets the variable); meaningless for gloo on CPU.
    Known("When using async grad allreduce", UserWarning, cpu_only=True),
)

_installed = False
_said_missing = False


def missing_packages_line() -> str | None:
    """What Megatron-Core falls back from, and what that costs; None when nothing is missing."""
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"note: {' and '.join(missing)} not installed: Megatron-Core uses torch optimizers, norms and "
            "per-tensor gradient-norm loops instead (slower steps on GPUs"
            + (", no FP8 and no te layer spec" if "Transformer Engine" in missing else "")
            + "; no difference on CPU). Install the `gpu` extra on CUDA machines.")


def _is_rank_zero() -> bool:
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "SLURM_PROCID"))


def _cuda_present() -> bool:
    # Without importing torch (slow): CUDA machines expose the NVIDIA driver.
    return os.path.exists("/proc/driver/nvidia/version") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


def install() -> None:
    """Hide the KNOWN warnings (here and in child processes) and say once what is missing."""
    global _installed
    if _installed:
        return
    _installed = True
    known = [k for k in KNOWN if not (k.cpu_only and _cuda_present())]
    entries = [f"ignore:{k.message}:{k.category.__name__}" for k in known]
    current = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(([current] if current else []) + entries)
    for k in known:
        if not k.about_missing_packages:
            warnings.filterwarnings("ignore", message=_regex(k.message), category=k.category)
    shown = warnings.showwarning
    missing = [k for k in known if k.about_missing_packages]
    for k in missing:  # shown to the hook below, which turns them into one line
        warnings.filterwarnings("always", message=_regex(k.message), category=k.category)

    def showwarning(message, category, filename, lineno, file=None, line=None):
        global _said_missing
        text = str(message)
        if any(issubclass(category, k.category) and text.startswith(k.message) for k in missing):
            if not _said_missing and _is_rank_zero():
                note = missing_packages_line()
                if note:
                    print(f"qmm: {note}", file=sys.stderr, flush=True)
            _said_missing = True
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _regex(prefix: str) -> str:
    import re

    return re.escape(prefix)
