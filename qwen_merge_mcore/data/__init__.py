"""The multimodal data pipeline: readers, templates, DALI preprocessing, packing (docs/data.md)."""

from .errors import BadSample, TooManyBadSamples
from .loader import TrainIterator, build_train_iterator

__all__ = ["BadSample", "TooManyBadSamples", "TrainIterator", "build_train_iterator"]
