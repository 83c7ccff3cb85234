"""Test helpers shared by the project's tests and benchmarks."""

from .distributed import run_distributed

__all__ = ["run_distributed"]
