"""Model merging: bring another language model's skill into a (Qwen-Merge) checkpoint, no training.

`methods` holds the tensor rules (linear, layer swap, TIES, DARE), `names` says which tensors
belong to the language model, `validate` refuses inputs that do not line up, and `stream`
runs a merge over Hugging Face folders one tensor at a time.
"""

from .spec import METHODS, MergeSpec
from .stream import merge_folders
from .validate import MergeValidationError

__all__ = ["METHODS", "MergeSpec", "MergeValidationError", "merge_folders"]
