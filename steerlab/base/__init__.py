"""Foundations: the error type, named options, input checks, file IO, progress, shards."""

from steerlab.base.choice import Choice
from steerlab.base.errors import SteerlabError
from steerlab.base.version import __version__

__all__ = [
    "Choice", "SteerlabError", "__version__",
]
