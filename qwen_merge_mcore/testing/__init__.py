"""Test helpers shared by the project's tests and benchmarks (the rank spawner itself lives in
`qwen_merge_mcore.distributed`)."""

from ..distributed import run_distributed

__all__ = ["run_distributed"]
