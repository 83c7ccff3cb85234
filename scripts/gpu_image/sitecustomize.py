"""Makes this interpreter look like the GPU check's machine (docs/gpu-check.md): the packages it
lacks fail to import. `scripts/gpu-check.sh --dry-run` puts this folder first on PYTHONPATH, so
that a CPU machine with the full install proves the GPU path needs none of them.

Megatron-Core and pytest-timeout are not blocked: they travel as wheels (scripts/gpu-wheels.sh).
"""

import importlib.abc
import sys

LACKING = ("nvidia.dali", "av", "pyarrow", "einops", "transformer_engine", "apex", "vllm")


class _Lacking(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in LACKING):
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU check's machine lacks it)", name=name)
        return None


sys.meta_path.insert(0, _Lacking())
