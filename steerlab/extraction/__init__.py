"""Activations to vectors: capture, the HDF5 store, sharded extraction, fitters."""

from steerlab.extraction.capture import capture_pairs
from steerlab.extraction.extract import ExtractConfig, extract
from steerlab.extraction.fitters import LogisticProbe, MeanDifference, PCADifference, fit_vector
from steerlab.extraction.store import ActivationFile

__all__ = [
    "ActivationFile", "ExtractConfig", "LogisticProbe", "MeanDifference", "PCADifference",
    "capture_pairs", "extract", "fit_vector",
]
