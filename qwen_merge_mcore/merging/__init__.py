"""Model merging: bring another language model's skill into a (Qwen-Merge) checkpoint, no training.

`methods` holds the tensor rules (linear, layer swap, TIES, DARE), `names` says which tensors
belong to the language model, `validate` refuses inputs that do not line up, and `stream`
runs a merge over Hugging Face folders one tensor at a time.
"""

from .spec import METHODS, MergeSpec

__all__ = ["METHODS", "MergeSpec", "MergeValidationError", "merge_folders"]


def __getattr__(name: str):
    # Imported on first use: they import torch, and `qmm --help` reads only METHODS.
    if name == "merge_folders":
        from .stream import merge_folders

        return merge_folders
    if name == "MergeValidationError":
        from .validate import MergeValidationError

        return MergeValidationError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
