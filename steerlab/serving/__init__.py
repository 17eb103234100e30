"""The OpenAI-compatible HTTP server: request parsing, batching, connection limits."""

from steerlab.serving.server import make_server
from steerlab.serving.shelf import VectorShelf

__all__ = [
    "VectorShelf", "make_server",
]
