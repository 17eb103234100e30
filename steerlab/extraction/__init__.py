"""Activations to vectors: capture, the HDF5 store, sharded extraction, fitters."""

from steerlab.extraction.capture import capture_pairs, tokenize_pair
from steerlab.extraction.extractor import ExtractConfig, extract, merge_shards
from steerlab.extraction.fitters import (
    LogisticProbe,
    MeanDifference,
    PCADifference,
    fit_vector,
    shuffled_control,
)
from steerlab.extraction.store import ActivationFile

__all__ = [
    "ActivationFile", "ExtractConfig", "LogisticProbe", "MeanDifference", "PCADifference",
    "capture_pairs", "extract", "fit_vector", "merge_shards", "shuffled_control",
    "tokenize_pair",
]
