"""Shared fixtures: the tiny checkpoints, the CPU multi-process harness; the hardware markers.

Markers (setup.cfg): `gpu` needs a CUDA GPU; `te` needs Transformer Engine as well, and such
tests carry both marks. Each is skipped with its reason where the machine lacks it. A `gpu` test
that needs 2 or more GPUs, or a package the GPU check's machine lacks (DALI, PyAV), skips itself
naming it. A run with `-m "gpu and not te"` (scripts/gpu-check.sh) lists the TE tests it left
out at the end, so that none goes missing silently.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The commands the tests run in this process draw progress bars; tqdm's monitor thread, started by
# the first bar and never stopped, would make every later `run_distributed` spawn its ranks
# instead of forking them (`distributed.start_method` refuses to fork beside another thread).
import tqdm  # noqa: E402

tqdm.tqdm.monitor_interval = 0

NO_CUDA = "needs a CUDA GPU (none on this machine)"
NO_TE = "needs Transformer Engine (install the `gpu` extra)"


def marker_skip_reason(markers: Iterable[str], cuda: bool, te: bool) -> Optional[str]:
    """Why a test with these marker names cannot run here, or None."""
    markers = set(markers)
    if "te" in markers and "gpu" not in markers:
        raise pytest.UsageError("a test marked `te` must be marked `gpu` too (Transformer Engine needs CUDA)")
    if "gpu" in markers and not cuda:
        return NO_CUDA
    if "te" in markers and not te:
        return NO_TE
    return None


def _marker_names(item) -> set[str]:
    return {m.name for m in item.iter_markers()} & {"gpu", "te"}


def pytest_collection_modifyitems(config, items):
    from qwen_merge_mcore.utils.runtime import cuda_available, te_available

    marked = [(item, _marker_names(item)) for item in items]
    marked = [(item, names) for item, names in marked if names]
    if not marked:
        return
    cuda, te = cuda_available(), te_available()
    for item, names in marked:
        try:
            reason = marker_skip_reason(names, cuda, te)
        except pytest.UsageError as err:
            raise pytest.UsageError(f"{item.nodeid}: {err}") from None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


_left_out_te: list[str] = []  # TE tests that `-m` deselected
_ran_gpu: list[bool] = []


def pytest_deselected(items):
    _left_out_te.extend(item.nodeid for item in items if item.get_closest_marker("te"))


def pytest_collection_finish(session):
    _ran_gpu.append(any(item.get_closest_marker("gpu") for item in session.items))


def pytest_terminal_summary(terminalreporter):
    """Name the TE tests a GPU run left out (`-m "gpu and not te"`)."""
    if _left_out_te and any(_ran_gpu):
        terminalreporter.section(f"{len(_left_out_te)} tests not selected: they need Transformer Engine")
        for nodeid in _left_out_te:
            terminalreporter.line(f"NOT RUN {nodeid}: {NO_TE}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of `qmm make-tiny` output (bf16 weights, as real checkpoints ship)."""
    from qwen_merge_mcore.fixtures import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture(scope="session")
def distributed():
    """`run_distributed(fn, world_size, tp, pp, vpp, args)` on CPU processes over gloo."""
    from qwen_merge_mcore.testing import run_distributed

    return run_distributed
