"""Why a training run stopped on its own, as one line for its user (the CLI prints these
without a traceback, see qwen_merge_mcore/cli.py)."""

from __future__ import annotations


class NonFiniteError(RuntimeError):
    """The loss, gradient norm or weights went non-finite: the run stops, and the non-finite
    weights never become a checkpoint."""
